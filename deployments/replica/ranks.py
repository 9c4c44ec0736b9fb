"""The follower ranks of a tensor-parallel replica, as Ray actors in its placement group.

A replica of ``tensor_parallel_size`` N is deployed with N placement-group bundles, packed
on one node (``STRICT_PACK``; ``deployments/app/builder.py``): Serve places the replica in
bundle 0, and ``launch_ranks`` places rank r's ``RankWorker`` actor in bundle r, one GPU
each on a GPU node. Ray and KubeRay thus schedule and account for every GPU of the replica,
and the replica's own process holds only rank 0's. Each actor runs the engine's
``follow_rank`` (plain Python and torch.distributed: ``worker/`` knows nothing of Ray)
until rank 0 tells it to stop, on the one GPU Ray gave it (``cuda:0`` as its
``CUDA_VISIBLE_DEVICES`` numbers it). The actors belong to the replica: when the replica
dies, Ray ends them with it.

``launch_ranks`` is the engine's launcher (``Engine(config, launcher=...)``; see
``worker.parallel.launch``); outside a placement group (an engine built in a test or a
script) it falls back to the engine's own processes.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from worker.parallel import launch
from worker.parallel.group import init_group

logger = logging.getLogger("ray.serve")
RANK_CPUS = 0.001  # a CPU bundle's share: Ray refuses empty bundles; ranks use the node's cores


class RankWorker:
    """Rank r of a replica: ``run`` is the follower's whole life."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, target, config, rank: int, size: int, port: int, device: str) -> int:
        return target(config, rank, size, port, device, exit_process=False)


class RankActors:
    """Ranks 1..N-1 as actors (what ``worker.parallel.launch.start`` returns for processes)."""

    def __init__(self, actors: list, runs: list, group, device: str):
        self.actors, self.runs, self.group, self.device = actors, runs, group, device

    def alive(self) -> bool:
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return not done

    def stop(self, timeout_s: float = launch.JOIN_TIMEOUT_S) -> None:
        """Wait ``timeout_s`` for the ranks to return (after rank 0's stop), then end them."""
        if timeout_s > 0:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def bundles(tp: int, num_gpus: float, num_cpus: float) -> list[dict]:
    """The placement-group bundles of a replica of ``tp`` ranks (``num_gpus`` and
    ``num_cpus``: the replica's totals)."""
    cpus = max(num_cpus / tp, RANK_CPUS)
    return [{"GPU": 1, "CPU": cpus} if num_gpus else {"CPU": cpus} for _ in range(tp)]


def launch_ranks(config, target):
    """Start ranks 1..N-1 in this replica's placement group and join them as rank 0."""
    pg = get_current_placement_group()
    if pg is None:  # not a Serve replica with bundles: the engine's own processes
        return launch.start(config, target)
    size, port = config.tensor_parallel_size, launch.free_port()
    device = "cuda:0" if config.is_cuda else "cpu"  # one GPU per actor, as Ray numbers it
    bundle = pg.bundle_specs[1] if len(pg.bundle_specs) > 1 else {}
    cls = ray.remote(RankWorker)
    actors = [cls.options(
        num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
        max_concurrency=2,  # run() blocks; pid() answers beside it
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=rank)).remote() for rank in range(1, size)]
    runs = [actor.run.remote(target, config, rank, size, port, device)
            for rank, actor in zip(range(1, size), actors)]
    try:
        group = init_group(0, size, "127.0.0.1", port, device, config.tp_step_timeout_s)
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise
    pids = ray.get([actor.pid.remote() for actor in actors])
    logger.info("tensor parallel: %d ranks, ranks 1..%d as actors in the replica's placement "
                "group (pids %s)", size, size - 1, ", ".join(map(str, pids)))
    return RankActors(actors, runs, group, device)
