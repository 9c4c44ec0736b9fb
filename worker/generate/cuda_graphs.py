"""CUDA graphs for decode-only generation steps.

A decode step of a small model is mostly kernel-launch time: hundreds of small kernels
per layer issued one by one from Python. As vLLM, SGLang and nano-vllm do, the model
forward of a decode-only step (and its logits) is captured once per batch-size bucket
and replayed. A step of ``B`` decodes is padded up to the smallest bucket ``b >= B``
(``graph_buckets``); the padding rows are laid out by ``worker.generate.inputs.stage_step``
(token 0 at position 0, K/V written to the reserved scratch slot, attention to that
slot alone, never sampled). Every tensor the graph reads lives at a fixed address: the
runner's device staging buffer (at offsets that depend on ``b`` alone), the persistent
block table (changed entries are scattered into it before the replay), the KV cache,
the weights, and ``logits``, the static output.

Mixed steps (any prefill chunk) and steps larger than the largest bucket run eager.
On CPU there are no graphs, but ``DecodeGraphs(..., capture=False)`` pads decode steps
to the buckets in eager mode, which is how CI tests the padding (the test switch).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch

from worker.generate.inputs import stage_step

logger = logging.getLogger(__name__)

GRAPH_BACKENDS = ("triton",)  # paged backends whose launches read no host values


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 to 64, then every 16, up to ``max_num_seqs`` (included)."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_num_seqs + 1, 16)]
    sizes = [b for b in sizes if b < max_num_seqs]
    return tuple(sizes + [max_num_seqs])


def graph_memory_estimate(model_config, dtype: torch.dtype, max_bucket: int,
                          activation_bytes_per_token: float | None) -> int:
    """Bytes to keep free for the graphs: the static fp32 logits, one largest bucket's
    transient activations (all graphs share one memory pool, captured largest first)
    and its head output, plus 256 MiB of slack for allocator rounding."""
    vocab = model_config.vocab_size
    per_token = activation_bytes_per_token or 64 * model_config.hidden_size * dtype.itemsize
    return int(max_bucket * (vocab * (4 + dtype.itemsize) + per_token)) + (256 << 20)


@dataclass(frozen=True)
class CaptureReport:
    buckets: tuple[int, ...]
    seconds: float
    memory_bytes: int  # the graph pool and static output, as the allocator saw them


class DecodeGraphs:
    """Bucketed decode steps for one ``GenRunner``: captured CUDA graphs, or eager padded
    forwards with ``capture=False``."""

    def __init__(self, runner, buckets: tuple[int, ...], *, capture: bool):
        self.runner, self.buckets, self.capture = runner, tuple(sorted(buckets)), capture
        self.max_bucket = self.buckets[-1]
        self.logits = torch.empty(self.max_bucket, runner.vocab_size, dtype=torch.float32,
                                  device=runner.device.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def bucket(self, out) -> int:
        """The bucket ``out`` runs in; 0 when it runs eager (prefill work, or too large)."""
        num = len(out.seqs)
        if out.num_decodes != num or out.num_tokens != num or num > self.max_bucket:
            return 0
        return self.buckets[bisect.bisect_left(self.buckets, num)]

    def run(self, b: int, meta) -> torch.Tensor:
        """The staged step of bucket ``b`` -> logits [b, vocab] (the static output)."""
        if self.capture:
            self.graphs[b].replay()
            return self.logits[:b]
        return self.runner.forward(self.runner.dev, meta, all_rows=True, out=self.logits[:b])

    @torch.inference_mode()
    def capture_all(self) -> CaptureReport:
        """Capture every bucket, largest first, into one memory pool; then check that a
        replay equals the eager forward. Raises on any failure (the caller falls back to
        eager steps)."""
        device = self.runner.device.device
        torch.cuda.synchronize(device)
        before, start = torch.cuda.memory_reserved(device), time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            meta = self._stage_padding(b)
            for _ in range(2):  # warm-up: Triton compiles, the allocator settles
                self.runner.forward(self.runner.dev, meta, all_rows=True, out=self.logits[:b])
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.runner.forward(self.runner.dev, meta, all_rows=True, out=self.logits[:b])
            self.graphs[b] = graph
        torch.cuda.synchronize(device)
        report = CaptureReport(self.buckets, time.perf_counter() - start,
                               torch.cuda.memory_reserved(device) - before
                               + self.logits.numel() * 4)
        for b in {self.buckets[0], self.max_bucket}:
            self._check(b)
        return report

    def _stage_padding(self, b: int):
        """A step of ``b`` padding rows, staged and copied (the capture's input)."""
        r = self.runner
        meta = stage_step(r.host.numpy(), r.state, [], [], r.state.starts[:0], [], pad_to=b)
        r._copy(meta.layout.words)
        return meta

    def _check(self, b: int) -> None:
        meta = self._stage_padding(b)
        want = self.runner.forward(self.runner.dev, meta, all_rows=True)
        self.graphs[b].replay()
        got = self.logits[:b]
        err = float((got - want).abs().max())
        if not err <= 1e-3 * (1.0 + float(want.abs().max())):
            raise RuntimeError(f"the graph of bucket {b} disagrees with the eager forward "
                               f"(max difference {err:.3g})")
