"""The ranks of one tensor-parallel replica: a torch.distributed process group.

``TPGroup`` is what the sharded layers (``worker.parallel.shard``) hold: this rank, the
number of ranks, and the process group their collectives run on (NCCL on CUDA, gloo on
CPU, so that every test runs on a machine without a GPU). A group of one rank is the
single-device engine: no layer is sharded and no collective runs.

``init_group`` joins the ranks over TCP (``host:port`` of rank 0), as ``torchrun`` does
with ``MASTER_ADDR``/``MASTER_PORT``; it starts nothing: whoever launches the ranks (a test,
the Serve layer) runs it once in each rank process.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    group: object = None  # a torch.distributed ProcessGroup (None: the default one)
    cpu_group: object = None  # gloo, for host tensors (each step's inputs); None: ``group``

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")

    @property
    def host_group(self):
        """Where host tensors travel (gloo: NCCL takes only device tensors)."""
        return self.cpu_group if self.cpu_group is not None else self.group

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (the KV blocks every rank can hold)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.host_group)
        return int(t.item())

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (equal shapes) concatenated along the last dim, rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_group(rank: int, size: int, host: str, port: int, device: torch.device | str = "cpu",
               timeout_s: float = 60.0) -> TPGroup:
    """Join the ``size`` ranks (rank 0 listens on ``host:port``) and return the group."""
    backend = backend_for(device)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}",
                            rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    cpu = dist.new_group(backend="gloo") if backend != "gloo" else None
    return TPGroup(rank, size, dist.group.WORLD, cpu)
