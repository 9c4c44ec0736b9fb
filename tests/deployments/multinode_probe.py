"""Where things run on a multi-node cluster, as JSON on stdout; run as a separate driver
process (the test process may already hold its own ``ray.init``):

    python -m tests.deployments.multinode_probe 127.0.0.1:GCS_PORT APP   (from the repo root)

Reads the GCS directly (nodes, the actor table), so it needs no dashboard.
"""

from __future__ import annotations

import json
import sys


def main(address: str, app_name: str) -> dict:
    import ray
    from ray import serve

    ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)
    nodes = {n["NodeID"]: {"node_manager_port": n["NodeManagerPort"], "alive": n["Alive"],
                           "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes()}
    actors = [{"name": a["Name"], "node_id": a["Address"]["NodeID"], "state": a["State"]}
              for a in ray._private.state.actors().values() if a["Name"]]
    app = serve.status().applications.get(app_name)
    deployments = {} if app is None else {
        name: {"status": str(d.status.value), "replicas": dict(d.replica_states)}
        for name, d in app.deployments.items()}
    return {"nodes": nodes, "actors": actors, "deployments": deployments,
            "app_status": None if app is None else str(app.status.value)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
