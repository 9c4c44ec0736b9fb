"""Start the follower ranks of a tensor-parallel engine, on this node, as processes.

The engine of rank 0 (``Engine(config)`` with ``tensor_parallel_size`` N > 1) calls a
launcher, by default ``start``: it spawns ranks 1..N-1 (``multiprocessing`` "spawn": a
fresh interpreter each, no inherited CUDA state), each running
``target(config, rank, N, port, device)`` (the engine's ``follow_rank``: build the same
engine on its shard, then follow rank 0's steps), and joins them in one process group on a
free loopback port. Rank r computes on ``cuda:r`` on CUDA (the replica's GPUs as
``CUDA_VISIBLE_DEVICES`` numbers them), on the CPU otherwise.

Another launcher (the Serve replica's, ``deployments/replica/ranks.py``: Ray actors in the
replica's placement group, one GPU each) is any callable ``launcher(config, target)`` that
returns what ``start`` returns: the group of rank 0, its device, ``alive()`` and ``stop``.
This module, like all of ``worker/``, knows nothing of Ray.

``Followers.stop`` ends them: after rank 0 has told them to stop (``StepSender.stop``)
they return and exit; one that does not within the timeout is terminated.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket

from worker.parallel.group import TPGroup, init_group

logger = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, rank: int) -> str:
    """Where rank ``rank`` computes: ``cuda:rank`` for ``cuda``, else ``device``."""
    return f"cuda:{rank}" if device == "cuda" else device


class Followers:
    """Ranks 1..N-1 of this engine (processes) and the group they share with rank 0;
    ``device``: where rank 0 computes."""

    def __init__(self, processes: list, group: TPGroup, device: str):
        self.processes, self.group, self.device = processes, group, device

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def stop(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Wait ``timeout_s`` for each to exit (0: rank 0 failed, do not wait), then
        terminate what is left, and kill what ignores that."""
        for p in self.processes:
            p.join(timeout_s)
            if p.is_alive():
                if timeout_s > 0:
                    logger.warning("tensor-parallel rank %s did not stop in %.0f s; "
                                   "terminated", p.name, timeout_s)
                p.terminate()
                p.join(JOIN_TIMEOUT_S)
            if p.is_alive():  # a hung rank (stopped, or stuck in a kernel) ignores SIGTERM
                logger.warning("tensor-parallel rank %s ignored SIGTERM; killed", p.name)
                p.kill()
                p.join(JOIN_TIMEOUT_S)


def leave_group() -> None:
    """This process's part of the group, ended (so that a later engine can form one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def start(config, target) -> Followers:
    """Spawn ranks 1..N-1 running ``target(config, rank, N, port, device)``; join the group
    as 0."""
    size, port = config.tensor_parallel_size, free_port()
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=target, daemon=True, name=f"packserve-tp-rank{rank}",
                             args=(config, rank, size, port, rank_device(config.device, rank)))
                 for rank in range(1, size)]
    for p in processes:
        p.start()
    device = rank_device(config.device, 0)
    try:
        group = init_group(0, size, "127.0.0.1", port, device, config.tp_step_timeout_s)
    except BaseException:
        for p in processes:
            p.terminate()
        raise
    logger.info("tensor parallel: %d ranks (pids %s follow rank 0)", size,
                ", ".join(str(p.pid) for p in processes))
    return Followers(processes, group, device)
