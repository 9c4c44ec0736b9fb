"""The KubeRay manifest: valid against the RayService CRD with unknown keys rejected, its
serveConfigV2 generated from cluster/cluster.yaml (drift fails), and every Serve config
strictly valid (Ray's schema, unknown Serve keys, packserve's args)."""

from __future__ import annotations

import copy
import importlib
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from deployments.app import kuberay
from deployments.app.serve_config import load_serve_config, validate_serve_config

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "cluster" / "rayservice.yaml"
CLUSTER = ROOT / "cluster" / "cluster.yaml"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
TP_MANIFEST = ROOT / "cluster" / "rayservice-tp4.yaml"  # one TP=4 replica per 4-GPU pod
TP_CLUSTER = ROOT / "cluster" / "cluster-tp4.yaml"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def strict(schema):
    """The CRD schema with ``additionalProperties: false`` wherever an object lists its
    ``properties`` and neither ``additionalProperties`` nor
    ``x-kubernetes-preserve-unknown-fields`` says otherwise: what the API server does with
    strict field validation (``kubectl apply --validate=strict``, the default since 1.27
    warns and strict fails). Objects declared without properties (``metadata``) stay open:
    the API server checks ObjectMeta on its own."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    crd = yaml.load(CRD.read_text(), Loader=Loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def errors(validator, doc) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(doc))


def test_manifest_validates_against_the_crd(validator, manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert errors(validator, manifest) == []


@pytest.mark.parametrize("path, bad_key", [
    (["spec"], "serveConfigv2"),
    (["spec", "rayClusterConfig", "headGroupSpec"], "rayStartParms"),
    (["spec", "rayClusterConfig", "workerGroupSpecs", 0], "maxReplica"),
    (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0],
     "readinesProbe"),
])
def test_a_misspelt_key_fails_validation(validator, manifest, path, bad_key):
    doc = copy.deepcopy(manifest)
    node = doc
    for step in path:
        node = node[step]
    node[bad_key] = node.get(bad_key.lower(), "x")
    found = errors(validator, doc)
    assert found, f"{bad_key} was accepted"
    assert any(repr(bad_key) in e and "not allowed" in e for e in found), found


def test_a_wrong_type_fails_validation(validator, manifest):
    doc = copy.deepcopy(manifest)
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    assert any("maxReplicas" in e for e in errors(validator, doc))


def test_head_has_no_gpus_and_workers_do(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in str(container.get("resources"))
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert container["readinessProbe"] and container["livenessProbe"]
            assert any(p["containerPort"] == 8080 for p in container["ports"])  # metrics
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_ray_versions_agree(manifest):
    import ray

    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    base = re.search(r"RAY_IMAGE=rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu", dockerfile)
    assert base, "cluster/Dockerfile: no rayproject/ray:<version>-py<XY>-gpu base"
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__ == base[1]
    assert f"{base[2]}.{base[3]}" == f"{sys.version_info.major}.{sys.version_info.minor}"
    images = {c["image"] for c in _containers(manifest)}
    assert len(images) == 1, f"head and workers must run one image, got {images}"


def _containers(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# ---- one source of truth ------------------------------------------------------------

def test_serve_config_v2_is_cluster_yaml():
    result = subprocess.run([sys.executable, "-m", "deployments.app.kuberay", "check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_drift_fails_with_a_diff_and_render_fixes_it(tmp_path, capsys):
    serve_config = tmp_path / "cluster.yaml"
    manifest = tmp_path / "rayservice.yaml"
    serve_config.write_text(CLUSTER.read_text().replace("max_replicas: 16", "max_replicas: 24"))
    manifest.write_text(MANIFEST.read_text())
    paths = ["--serve-config", str(serve_config), "--manifest", str(manifest)]
    assert kuberay.main(["check", *paths]) == 1
    stderr = capsys.readouterr().err
    assert "-            max_replicas: 24" in stderr
    assert "+            max_replicas: 16" in stderr
    assert "kuberay render" in stderr

    assert kuberay.main(["render", *paths]) == 0
    assert kuberay.main(["check", *paths]) == 0
    rendered = manifest.read_text()
    assert kuberay.drift(rendered, serve_config.read_text()) == ""
    outside = [line for line in rendered.splitlines() if "max_replicas" not in line]
    original = [line for line in MANIFEST.read_text().splitlines() if "max_replicas" not in line]
    assert outside == original  # only the changed line moved: comments and the rest kept
    assert kuberay.render(rendered, serve_config.read_text()) == rendered  # idempotent


def test_every_ray_container_carries_the_proxy_guard_env(manifest):
    """Serve's proxy reads its client limits from its environment at start; on KubeRay
    that is the pod's, so the manifest carries what ``packserve serve`` would set."""
    want = kuberay.guard_env_of(CLUSTER.read_text())
    module, _, name = want["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert {"PACKSERVE_GUARD_HEADER_TIMEOUT_S", "PACKSERVE_GUARD_DRAIN_TIMEOUT_S"} <= set(want)
    for container in _containers(manifest):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in want} == want, container["name"]


def test_a_guard_limit_changed_in_the_serve_config_fails_check_until_the_env_follows(
        tmp_path, capsys):
    serve_config = tmp_path / "cluster.yaml"
    manifest = tmp_path / "rayservice.yaml"
    text = CLUSTER.read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("max_body_bytes:"))
    indent = line[:len(line) - len(line.lstrip())]
    serve_config.write_text(text.replace(line, f"{line}\n{indent}header_timeout_s: 5.0"))
    manifest.write_text(MANIFEST.read_text())
    paths = ["--serve-config", str(serve_config), "--manifest", str(manifest)]
    assert kuberay.main(["render", *paths]) == 0
    capsys.readouterr()
    assert kuberay.main(["check", *paths]) == 1  # serveConfigV2 matches; the env does not
    stderr = capsys.readouterr().err
    for container in ("ray-head", "ray-worker"):
        assert (f"container {container}: env PACKSERVE_GUARD_HEADER_TIMEOUT_S is '10.0', "
                "the Serve config gives '5.0'") in stderr
    manifest.write_text(manifest.read_text().replace(
        'PACKSERVE_GUARD_HEADER_TIMEOUT_S, value: "10.0"',
        'PACKSERVE_GUARD_HEADER_TIMEOUT_S, value: "5.0"'))
    assert kuberay.main(["check", *paths]) == 0
    capsys.readouterr()
    assert kuberay.main(["env", "--serve-config", str(serve_config)]) == 0  # for `ray start`
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == kuberay.guard_env_of(serve_config.read_text())
    assert printed["PACKSERVE_GUARD_HEADER_TIMEOUT_S"] == "5.0"


def test_the_tensor_parallel_example_validates_and_fits_one_replica_per_pod(validator):
    """cluster/rayservice-tp4.yaml: valid against the CRD, its serveConfigV2 rendered from
    cluster-tp4.yaml with the guard env (kuberay check), and each worker pod holds exactly
    one TP=4 replica's GPUs, so Ray places a replica on one pod whole."""
    manifest = yaml.safe_load(TP_MANIFEST.read_text())
    assert errors(validator, manifest) == []
    assert kuberay.main(["check", "--serve-config", str(TP_CLUSTER),
                         "--manifest", str(TP_MANIFEST)]) == 0
    (model,) = yaml.safe_load(TP_CLUSTER.read_text())["applications"][0]["args"]["models"]
    tp = model["engine"]["tensor_parallel_size"]
    assert tp == 4 == model["num_gpus"]
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == tp
    assert model["num_replicas"] == group["replicas"] == group["maxReplicas"]


def test_extract_is_the_reverse_of_render(tmp_path):
    serve_config = tmp_path / "cluster.yaml"
    assert kuberay.main(["extract", "--serve-config", str(serve_config),
                         "--manifest", str(MANIFEST)]) == 0
    assert serve_config.read_text() == CLUSTER.read_text()


# ---- strict Serve configs -----------------------------------------------------------

@pytest.mark.parametrize("path", [MANIFEST, CLUSTER, ROOT / "cluster" / "local.yaml",
                                  TP_MANIFEST, TP_CLUSTER])
def test_shipped_serve_configs_are_strictly_valid(path):
    assert validate_serve_config(load_serve_config(path)) == []


def test_unknown_serve_keys_are_named_with_their_path():
    config = yaml.safe_load(CLUSTER.read_text())
    config["http_options"]["hots"] = "0.0.0.0"
    app = config["applications"][0]
    app["deployments"] = [{"name": "OpenAIIngress", "max_ongoing_request": 5,
                           "ray_actor_options": {"num_cpu": 0, "resources": {"any": 1}},
                           "autoscaling_config": {"max_replica": 2}}]
    app["args"]["models"][0]["autoscaling"]["target_utilization"] = 0.5
    problems = validate_serve_config(config)
    for where in ["http_options.hots", "applications[0].deployments[0].max_ongoing_request",
                  "applications[0].deployments[0].ray_actor_options.num_cpu",
                  "applications[0].deployments[0].autoscaling_config.max_replica",
                  "applications[0].args.models[0].autoscaling.target_utilization"]:
        assert any(p.startswith(where + ":") and "unknown key" in p for p in problems), (
            where, problems)
    assert not any("resources.any" in p for p in problems)  # free-form dicts stay open
    assert len(problems) == 5


def test_ray_schema_errors_are_reported():
    config = yaml.safe_load(CLUSTER.read_text())
    config["proxy_location"] = "Everywhere"
    config["applications"][0]["args"]["models"][0]["autoscaling"]["min_replicas"] = 0
    problems = validate_serve_config(config)
    assert any(p.startswith("proxy_location:") for p in problems), problems
    assert any("models[0].autoscaling.min_replicas" in p for p in problems), problems


def test_cli_exits_1_naming_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "cluster" / "local.yaml").read_text().replace(
        "max_num_batched_tokens: 2048", "max_num_batch_tokens: 2048"))
    result = subprocess.run([sys.executable, "-m", "deployments.app.serve_config", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "models[1].engine.max_num_batch_tokens: unknown key" in result.stderr
