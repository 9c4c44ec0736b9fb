"""What a forward's attention layers attend with: set by a runner around the model call,
read by the registered attention function in every layer.

Why not forward kwargs: transformers threads ``**kwargs`` from the model's forward down
to the attention function in most families, not in all. StableLM's decoder layer calls
its attention without them (seen in transformers 5.25), so a ``cu_seq_lens_q`` or a paged
context passed as a kwarg never arrived: the attention ran over the whole step as one
causal sequence, and generation returned wrong tokens from the second one on while
single-sequence scores still agreed. A context variable reaches every layer whatever the
model's code does in between, and a count of the layers that read it proves it did
(``worker.models.proof``).

| context          | set by                             | the attention function does         |
|------------------|------------------------------------|-------------------------------------|
| ``PackedSegments`` | ``worker.packed.runner`` (a bin) | the packed backend over its segments |
| ``PagedContext``   | ``worker.generate.runner`` (a step) | write K/V to the cache, paged attention |
| none             | direct calls (tests, tools)        | the packed backend with the call's kwargs |
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedSegments:
    """The sequences of one packed, cache-free forward (batch 1 over ``T`` tokens)."""

    cu_seqlens: torch.Tensor  # [B + 1] int32, on the model's device
    max_seqlen: int  # longest sequence of the bin
    groups: object = None  # worker.attention.cpu.SegmentGroups (CPU reference backend) or None

    def kwargs(self) -> dict:
        """The varlen keywords the packed backends take."""
        return dict(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                    max_length_q=self.max_seqlen, max_length_k=self.max_seqlen,
                    packserve_groups=self.groups)


class ActiveContext:
    """The context of the forward in flight and how many attention calls read it."""

    __slots__ = ("context", "num_calls")

    def __init__(self, context):
        self.context, self.num_calls = context, 0


_CURRENT: ContextVar[ActiveContext | None] = ContextVar("packserve_attention", default=None)


@contextlib.contextmanager
def attention_context(context):
    """Run a forward with ``context`` (``PackedSegments`` or a ``PagedContext``) visible
    to every attention layer; yields the ``ActiveContext`` that counts their calls."""
    active = ActiveContext(context)
    token = _CURRENT.set(active)
    try:
        yield active
    finally:
        _CURRENT.reset(token)


def current() -> ActiveContext | None:
    return _CURRENT.get()
