"""One scheduler for all ranks: rank 0 sends each generation step's inputs, the other
ranks run the same forward on their shards.

Rank 0's engine schedules, stages and samples as on one device. Just before its forward,
``GenRunner.run`` hands the staged step to a ``StepSender``, which broadcasts it from rank
0 on the group's host (gloo) group in two messages: a fixed header of ``HEADER`` int64
words, then one int64 payload. Every other rank runs ``follow``: it receives the step,
puts the words where its own runner would have staged them, applies the block-table
updates to its own table, and runs its runner's ``forward``, whose collectives (the
row-parallel all-reduces, the LM head's all-gather) meet rank 0's. A follower holds its own
KV cache of its heads and its own block table; it never schedules, samples or sees a
request: the words and the table updates are the whole step.

| header word | what                                   |
|-------------|----------------------------------------|
| 0           | kind: ``STEP`` or ``STOP``             |
| 1-4         | the step layout: t, s, b, u            |
| 5-7         | max_seqlen_q, num_real, width          |
| 8           | upload_table (1: the whole table follows the words) |
| 9           | payload words                          |

Payload: ``cu_seqlens_q`` [b + 1], ``seqlens_k`` [b], the step's buffer words
[``layout.words``], then the block table when ``upload_table``.

Not yet under a sender: the packed path (embed, score, classify), CUDA graphs, and an
out-of-memory forward on one rank (issue 22 lists them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from worker.generate.inputs import HostMeta, StepLayout, apply_updates
from worker.parallel.group import TPGroup

STOP, STEP = 0, 1
HEADER = 10


class StepSender:
    """Rank 0's end: ``send`` each staged step, ``stop`` once at the end."""

    def __init__(self, tp: TPGroup):
        if tp.rank != 0:
            raise ValueError(f"only rank 0 sends steps (this is rank {tp.rank})")
        self.tp = tp
        self.num_sent = 0

    def send(self, meta: HostMeta, words: torch.Tensor, table: np.ndarray) -> None:
        """``words``: the host step buffer (its first ``layout.words`` are sent);
        ``table``: the host block table (sent when the step uploads it whole)."""
        lay = meta.layout
        parts = [torch.from_numpy(np.ascontiguousarray(meta.cu_seqlens_q, np.int64)),
                 torch.from_numpy(np.ascontiguousarray(meta.seqlens_k, np.int64)),
                 words[: lay.words]]
        if meta.upload_table:
            parts.append(torch.from_numpy(table.astype(np.int64).reshape(-1)))
        payload = torch.cat(parts)
        header = torch.tensor([STEP, lay.t, lay.s, lay.b, lay.u, meta.max_seqlen_q,
                               meta.num_real, meta.width, int(meta.upload_table),
                               payload.numel()], dtype=torch.int64)
        group = self.tp.host_group
        dist.broadcast(header, src=0, group=group)
        dist.broadcast(payload, src=0, group=group)
        self.num_sent += 1

    def stop(self) -> None:
        """Tell the followers there are no more steps (they return from ``follow``)."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = STOP
        dist.broadcast(header, src=0, group=self.tp.host_group)


def receive(tp: TPGroup, table_shape: tuple[int, int]):
    """The next step from rank 0 as ``(meta, words, table | None)``; None at ``STOP``."""
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=tp.host_group)
    kind, t, s, b, u, max_q, num_real, width, upload, n = header.tolist()
    if kind == STOP:
        return None
    payload = torch.empty(n, dtype=torch.int64)
    dist.broadcast(payload, src=0, group=tp.host_group)
    lay = StepLayout(t, s, b, u)
    cu, seqlens = payload[: b + 1].numpy(), payload[b + 1: 2 * b + 1].numpy()
    words = payload[2 * b + 1: 2 * b + 1 + lay.words]
    table = None
    if upload:
        table = payload[2 * b + 1 + lay.words:].numpy().astype(np.int32).reshape(table_shape)
    meta = HostMeta(lay, cu, seqlens, max_q, num_real, width, bool(upload))
    return meta, words, table


def follow(runner, tp: TPGroup) -> int:
    """Run rank 0's steps on this rank's shard until ``STOP``; returns the steps run.
    ``runner``: this rank's ``GenRunner`` (its model sharded, its cache of its heads)."""
    num_steps = 0
    with torch.inference_mode():
        while (step := receive(tp, runner.state.tables.shape)) is not None:
            meta, words, table = step
            if table is not None:
                runner.state.tables[:] = table
            runner.host[: meta.layout.words].copy_(words)
            dev = runner._copy(meta.layout.words)
            apply_updates(runner.table, dev, meta, runner.state)
            runner.forward(dev, meta)
            num_steps += 1
    return num_steps
