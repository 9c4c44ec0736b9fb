"""The ranks of one tensor-parallel replica: a torch.distributed process group.

``TPGroup`` is what the sharded layers (``worker.parallel.shard``) hold: this rank, the
number of ranks, and the process group their collectives run on (NCCL on CUDA, gloo on
CPU, so that every test runs on a machine without a GPU). A group of one rank is the
single-device engine: no layer is sharded and no collective runs.

``init_group`` joins the ranks over TCP (``host:port`` of rank 0), as ``torchrun`` does
with ``MASTER_ADDR``/``MASTER_PORT``; it starts nothing: whoever launches the ranks (a test,
the Serve layer) runs it once in each rank process.

Two timeouts. A step's collectives (its inputs' broadcast, the all-reduces, the all-gather)
run on groups that give up after ``step_timeout_s``: a rank that hangs mid-step fails the
step on every other rank in bounded time, and the engine then dies (its requests end with
an error, Serve restarts the replica). Waiting for the next step is not bounded: a
follower may wait for hours while the replica is idle, so the step's first message and the
start-up agreements (``min_int``) travel on ``idle_group``, a gloo group whose timeout is
``IDLE_TIMEOUT`` (one found with a single timeout died after 60 idle seconds). Rank 0's
send on it is still bounded: it waits ``step_timeout_s`` for the others to take the step
(``StepSender``), since a hung rank never posts its receive.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from worker.core.memory import proc_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    group: object = None  # a torch.distributed ProcessGroup (None: the default one)
    cpu_group: object = None  # gloo, for host tensors (each step's inputs); None: ``group``
    idle_group: object = None  # gloo, unbounded: the wait for the next step; None: host
    step_timeout_s: float = 60.0  # what rank 0 waits for the others to take a step

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")

    @property
    def host_group(self):
        """Where host tensors travel (gloo: NCCL takes only device tensors)."""
        return self.cpu_group if self.cpu_group is not None else self.group

    @property
    def wait_group(self):
        """Where a rank waits without a bound (the next step, the other ranks' start-up)."""
        return self.idle_group if self.idle_group is not None else self.host_group

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (the KV blocks every rank can hold). Ranks
        reach it as they finish loading, minutes apart for a large model: no bound."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.wait_group)
        return int(t.item())

    def all_gather_floats(self, values: list[float]) -> list[float]:
        """Every rank's ``values`` (equal lengths), rank order, on the unbounded group."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.size == 1:
            return t.tolist()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.wait_group)
        return torch.cat(parts).tolist()

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


IDLE_TIMEOUT = timedelta(days=365)
START_TIMEOUT = timedelta(seconds=120)  # the ranks' rendezvous: fresh interpreters import


def init_group(rank: int, size: int, host: str, port: int, device: torch.device | str = "cpu",
               step_timeout_s: float = 60.0) -> TPGroup:
    """Join the ``size`` ranks (rank 0 listens on ``host:port``) and return the group:
    step collectives bounded by ``step_timeout_s``, the wait between steps unbounded."""
    backend = backend_for(device)
    step = timedelta(seconds=step_timeout_s)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}",
                            rank=rank, world_size=size, timeout=START_TIMEOUT)
    group = dist.new_group(backend=backend, timeout=step)
    cpu = dist.new_group(backend="gloo", timeout=step) if backend != "gloo" else None
    idle = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TPGroup(rank, size, group, cpu, idle, step_timeout_s)


def available_host_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux); None where it cannot be read."""
    return proc_bytes("/proc/meminfo", "MemAvailable:")


@contextlib.contextmanager
def load_in_turn(tp: TPGroup, mode: str, checkpoint_bytes: int):
    """Read the checkpoint in rank order, one rank at a time, when ``mode`` is "serial",
    or "auto" and any rank finds that the node's available memory cannot hold
    ``tp.size`` host copies (each rank reads the whole checkpoint before keeping its
    shard); yields whether it does. A rank that fails while it reads does not pass the
    turn on: the next rank's wait ends when the failed one's connection closes."""
    serial = mode == "serial"
    if mode == "auto":
        free = available_host_bytes()
        fits = free is None or checkpoint_bytes * tp.size <= 0.9 * free
        serial = tp.min_int(int(fits)) == 0  # one rank short of memory: all take turns
    if serial and tp.rank > 0:
        dist.recv(torch.zeros(1), src=tp.rank - 1, group=tp.wait_group)
    yield serial
    if serial and tp.rank < tp.size - 1:
        dist.send(torch.ones(1), dst=tp.rank + 1, group=tp.wait_group)
