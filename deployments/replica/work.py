"""What the ingress hands an engine replica, and what a replica says about itself.

Plain frozen dataclasses (pickled by Ray). Token ids only: text never reaches a replica
for its input, tensors never reach the ingress. ``num_tokens`` is what the request's
lease holds; the router reads it to rank replicas by free tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.models.labels import LabelSpec
from worker.params import SamplingParams


@dataclass(frozen=True)
class Work:
    lease_id: str | None  # the admission lease to report while serving (None: admission off)
    num_tokens: int  # tokens reserved for this request


@dataclass(frozen=True)
class GenerateWork(Work):
    prompt_token_ids: list[int]  # [prompt_len]
    params: SamplingParams
    lora: str | None = None  # the LoRA adapter's name (None: the base model)
    lora_path: str | None = None  # where it is: the replica registers it on first use


@dataclass(frozen=True)
class EmbedWork(Work):
    inputs: list[list[int]]  # [num_inputs][len_i]
    pooling: str | None
    normalize: bool


@dataclass(frozen=True)
class ScoreWork(Work):
    inputs: list[list[int]]  # [num_inputs][len_i]; each needs >= 2 tokens to score any


@dataclass(frozen=True)
class ClassifyWork(Work):
    inputs: list[list[int]]  # [num_inputs][len_i]; a pair is one sequence (tokenizer-joined)
    token_type_ids: list[list[int]] | None  # [num_inputs][len_i] for BERT-style pairs


@dataclass(frozen=True)
class Refusal:
    """A client error a replica found (a bad token id, a sequence over its budget),
    returned rather than raised: Serve logs every exception a replica method raises as
    "Request failed." with its traceback, and a client's mistake is not the server's
    error. The ingress turns it into the 4xx that ``error`` maps to."""

    error: Exception  # a worker.core.errors.InvalidRequestError (pickles with its fields)


@dataclass(frozen=True)
class ModelInfo:
    """A replica's model, as the ingress validates against it and /v1/models lists it."""

    name: str
    is_decoder: bool  # decoders generate and score; encoders embed only
    can_generate: bool  # a decoder with a tokenizer
    max_model_len: int  # longest sequence (prompt + generated) accepted
    vocab_size: int
    hidden_size: int  # embedding dimensions
    capacity_tokens: int  # what admission reserves against, per replica
    token_budget: int  # tokens per bin (max_num_batched_tokens)
    smoke_test: bool  # random weights: output is noise
    device: str
    attention_backend: str
    labels: LabelSpec | None = None  # a sequence classifier (cross-encoder: one label)
    model_type: str = ""  # transformers' model_type (the family)
    unproven: tuple[str, ...] = ()  # outside the family matrix (allow_untested_model)
    tensor_parallel_size: int = 1  # ranks of the replica

    @property
    def is_classifier(self) -> bool:
        return self.labels is not None

    @property
    def can_rerank(self) -> bool:
        """A cross-encoder, or an embedding model (cosine similarity)."""
        if self.is_classifier:
            return self.labels.is_cross_encoder
        return not self.can_generate

    @property
    def tasks(self) -> list[str]:
        """What /v1/models lists; each name is an endpoint the model serves (and the
        metrics' ``endpoint`` label of its route, routes.py)."""
        if self.can_generate:
            return ["completions", "chat", "responses", "embeddings"]
        tasks = ["classify", "embeddings"] if self.is_classifier else ["embeddings"]
        return tasks + (["score", "rerank"] if self.can_rerank else [])
