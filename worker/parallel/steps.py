"""One scheduler for all ranks: rank 0 sends each step's inputs, the other ranks run the
same forward on their shards.

Rank 0's engine schedules, stages and samples as on one device. Just before its forward,
``GenRunner.run`` hands the staged step to a ``StepSender``, which broadcasts it from rank
0 on the group's host (gloo) group in two messages: a fixed header of ``HEADER`` int64
words, then one int64 payload. Every other rank runs ``follow``: it receives the step,
puts the words where its own runner would have staged them, applies the block-table
updates to its own table, and runs its runner's ``forward``, whose collectives (the
row-parallel all-reduces, the LM head's all-gather) meet rank 0's. A follower holds its own
KV cache of its heads and its own block table; it never schedules, samples or sees a
request: the words and the table updates are the whole step.

| header word | ``STEP`` (a generation step)      | ``BIN`` (a packed bin)             |
|-------------|-----------------------------------|------------------------------------|
| 0           | kind: ``STEP``, ``BIN``, ``ASK``, ``PROBED`` or ``STOP`` | kind      |
| 1-4         | the step layout: t, s, b, u       | tokens, sequences, max_seqlen, the scoring rows' end (0: none) |
| 5-7         | max_seqlen_q, num_real, width     | 0                                  |
| 8           | upload_table (1: the whole table follows the words) | 0                |
| 9           | payload words                     | payload words                      |

``STEP`` payload: ``cu_seqlens_q`` [b + 1], ``seqlens_k`` [b], the step's buffer words
[``layout.words``], then the block table when ``upload_table``. ``BIN`` payload: the bin's
staging words (``Staging.host_words``: ids, positions, cu_seqlens); the follower runs
the forward and, for scoring rows, the LM head (``ModelRunner.follow_bin``): embeddings
and scores are served under TP, pooled and returned by rank 0 alone.

During the start-up probe (``worker.parallel.probe``) rank 0 also sends ``ASK`` (word 1:
the question; every rank answers ``ANSWER`` words, gathered) and, at its end, ``PROBED``.

The header travels on the group without a timeout (a follower waits for it as long as the
replica idles), the payload and the forward's collectives on the bounded ones
(``worker.parallel.group``). An out-of-memory forward on any rank fails the step, and the
engine, on every rank: the others are inside collectives that no retry could meet.
Not yet under a sender: CUDA graphs (a TP engine's decode steps run eager).
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from worker.generate.inputs import HostMeta, StepLayout, apply_updates
from worker.parallel.group import TPGroup

STOP, STEP, BIN, ASK, PROBED = 0, 1, 2, 3, 4
HEADER = 10
ANSWER = 3  # int64 words each rank answers an ``ASK`` with (``worker.parallel.probe``)


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
        self._announce(header)
        dist.broadcast(payload, src=0, group=self.tp.host_group)  # mid-step: bounded
        self.num_sent += 1

    def send_bin(self, words: torch.Tensor, staged, score_end: int) -> None:
        """``words``: the bin's staging words; ``staged``: its ``StagedBin``;
        ``score_end``: the end of its scoring rows (0: it scores nothing)."""
        header = torch.tensor([BIN, staged.num_tokens, staged.num_seqs, staged.max_seqlen,
                               score_end, 0, 0, 0, 0, words.numel()], dtype=torch.int64)
        self._announce(header)
        dist.broadcast(words.contiguous(), src=0, group=self.tp.host_group)
        self.num_sent += 1

    def ask(self, op: int, answer) -> list[list[int]]:
        """Every rank's ``ANSWER`` words to ``op`` (the budget probe's memory readings,
        ``worker.parallel.probe``), rank order; ``answer(op)``: this rank's."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0], header[1] = ASK, op
        self._announce(header)
        return gather_answer(self.tp, answer(op))

    def end_probe(self) -> None:
        """The budget probe is over: the followers return from ``follow_probe``."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = PROBED
        self._announce(header)

    def stop(self) -> None:
        """Tell the followers there are no more steps (they return from ``follow``)."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = STOP
        self._announce(header)

    def _announce(self, header: torch.Tensor) -> None:
        """The header, on the group the followers idle on; a follower that does not take
        it within the step timeout (hung: its receive is never posted) fails the step."""
        work = dist.broadcast(header, src=0, group=self.tp.wait_group, async_op=True)
        work.wait(timeout=timedelta(seconds=self.tp.step_timeout_s))


def receive(tp: TPGroup, table_shape: tuple[int, int]):
    """The next message from rank 0: ``(STEP, meta, words, table | None)``,
    ``(BIN, words, (tokens, seqs, max_seqlen, score_end))``, ``(ASK, op)``, ``(PROBED, 0)``,
    or None at ``STOP``."""
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=tp.wait_group)  # as long as the replica is idle
    kind, t, s, b, u, max_q, num_real, width, upload, n = header.tolist()
    if kind == STOP:
        return None
    if kind in (ASK, PROBED):
        return kind, t
    payload = torch.empty(n, dtype=torch.int64)
    dist.broadcast(payload, src=0, group=tp.host_group)
    if kind == BIN:
        return BIN, payload, (t, s, b, u)
    lay = StepLayout(t, s, b, u)
    cu, seqlens = payload[: b + 1].numpy(), payload[b + 1: 2 * b + 1].numpy()
    words = payload[2 * b + 1: 2 * b + 1 + lay.words]
    table = None
    if upload:
        table = payload[2 * b + 1 + lay.words:].numpy().astype(np.int32).reshape(table_shape)
    meta = HostMeta(lay, cu, seqlens, max_q, num_real, width, bool(upload))
    return STEP, meta, words, table


def gather_answer(tp: TPGroup, words: list[int]) -> list[list[int]]:
    """Every rank's ``ANSWER`` words, rank order (on the group without a bound: a rank may
    still be in the forward that the question follows)."""
    mine = torch.tensor(words, dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(parts, mine, group=tp.wait_group)
    return [p.tolist() for p in parts]


def follow(runner, tp: TPGroup, packed=None) -> int:
    """Run rank 0's steps on this rank's shard until ``STOP``; returns the messages run.
    ``runner``: this rank's ``GenRunner`` (its model sharded, its cache of its heads), None
    for a model that does not generate (a classifier); ``packed``: its packed
    ``ModelRunner`` (the same model), for ``BIN`` messages."""
    num_steps = 0
    shape = runner.state.tables.shape if runner is not None else (0, 0)
    with torch.inference_mode():
        while (message := receive(tp, shape)) is not None:
            num_steps += 1
            if message[0] == BIN:
                follow_bin(packed, message)
                continue
            if message[0] != STEP:
                raise RuntimeError(f"rank 0 sent message kind {message[0]} between steps")
            _, meta, words, table = message
            if table is not None:
                runner.state.tables[:] = table
            runner.host[: meta.layout.words].copy_(words)
            dev = runner._copy(meta.layout.words)
            apply_updates(runner.table, dev, meta, runner.state)
            runner.forward(dev, meta)
    return num_steps


def follow_bin(packed, message) -> None:
    """A ``BIN`` message on this rank's packed runner."""
    _, words, (tokens, seqs, max_seqlen, score_end) = message
    if packed is None:
        raise RuntimeError("rank 0 sent a packed bin to a follower without a packed runner")
    packed.follow_bin(packed.staging.stage_words(words, tokens, seqs, max_seqlen), score_end)
