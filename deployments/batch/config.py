"""The batch job's settings: one frozen dataclass, validated on construction.

The engine's own settings are checked by ``worker.EngineConfig`` (built once here so a
bad ``--dtype`` fails before Ray starts). ``fingerprint()`` is what a resumed run must
share with the run that wrote the parts; anything that changes outputs is in it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.core.config import EngineConfig, check_choice, check_int

if TYPE_CHECKING:
    from worker.params import SamplingParams

TASKS = ("embed", "score", "generate", "classify")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class JobConfigError(ValueError):
    """A job setting is invalid; the message names the command-line option."""

    def __init__(self, option: str, message: str):
        super().__init__(f"--{option}: {message}")
        self.option = option


class JobError(RuntimeError):
    """The job cannot start, resume or finish; the message says which setting to change."""


@dataclass(frozen=True)
class JobConfig:
    """One ``packserve batch`` run. Paths are kept as given; ``None`` fields are derived."""

    model: str  # hub id or local directory (weights and tokenizer)
    task: str  # embed | score | generate | classify
    input: str  # .jsonl / .ndjson / .parquet
    output: str  # .jsonl / .ndjson / .parquet, assembled from the parts at the end
    text_field: str = "text"
    id_field: str = "id"  # "" = key the output by row number (0-based)
    errors: str | None = None  # None: <output stem>.errors.jsonl beside the output
    parts_dir: str | None = None  # None: <output>.parts/
    shard_size: int = 1000  # input rows per shard (the unit of work and of resume)
    padded_batch_size: int = 32  # the padded-in-file-order baseline of the summary
    overwrite: bool = False  # discard parts of an earlier run with other settings
    remove_parts: bool = False  # delete the parts directory once the output is assembled
    # engine (see worker.EngineConfig)
    device: str = "auto"  # auto: one actor per GPU when the cluster has GPUs, else CPU
    dtype: str = "auto"
    attention_backend: str = "auto"
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    trust_remote_code: bool = False
    allow_untested_model: bool = False  # EngineConfig.allow_untested_model
    tensor_parallel_size: int = 1  # ranks per engine actor (EngineConfig); GPUs per actor
    # cluster
    address: str | None = None  # join this Ray cluster; None: a new local one
    num_actors: int | None = None  # None: one per GPU (GPU), 1 (CPU)
    num_cpus_per_actor: float = 1.0
    # task options
    pooling: str | None = None  # embed: mean | last | cls; None = the model's default
    normalize: bool = False  # embed: L2-normalize
    sampling: SamplingParams | None = None  # generate; None = SamplingParams()
    lora: tuple[str, str] | None = None  # generate: (name, PEFT directory) every row runs with
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS, error=JobConfigError)
        check_choice("device", self.device, DEVICES, error=JobConfigError)
        for option in ("input", "output", "model"):
            if not isinstance(getattr(self, option), str) or not getattr(self, option):
                raise JobConfigError(option, f"must be a path, got {getattr(self, option)!r}")
        _format("input", self.input)
        _format("output", self.output)
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise JobConfigError("output", f"must differ from --input ({self.input})")
        if not self.text_field:
            raise JobConfigError("text-field", "must name a field, got ''")
        check_int("shard-size", self.shard_size, 1, error=JobConfigError)
        check_int("padded-batch-size", self.padded_batch_size, 1, error=JobConfigError)
        if self.num_actors is not None:
            check_int("num-actors", self.num_actors, 1, error=JobConfigError)
        if not isinstance(self.num_cpus_per_actor, (int, float)) or self.num_cpus_per_actor <= 0:
            raise JobConfigError("num-cpus-per-actor", f"must be > 0, got {self.num_cpus_per_actor!r}")
        if self.task != "embed" and (self.pooling is not None or self.normalize):
            raise JobConfigError("pooling", f"--pooling and --normalize are for embed, not "
                                 f"{self.task}")
        if self.pooling not in (None, "mean", "last", "cls"):
            raise JobConfigError("pooling", f"must be mean, last or cls, got {self.pooling!r}")
        if self.task != "generate" and self.sampling is not None:
            raise JobConfigError("max-tokens", f"sampling options are for generate, not "
                                 f"{self.task}")
        if self.lora is not None and self.task != "generate":
            raise JobConfigError("lora", f"adapters are for generate, not {self.task}")
        self.engine_config("cpu" if self.device == "cpu" else "cuda")  # validates them

    @property
    def input_format(self) -> str:
        return _format("input", self.input)

    @property
    def output_format(self) -> str:
        return _format("output", self.output)

    @property
    def errors_path(self) -> Path:
        if self.errors:
            return Path(self.errors)
        out = Path(self.output)
        return out.with_name(out.name.removesuffix(out.suffix) + ".errors.jsonl")

    @property
    def parts_path(self) -> Path:
        return Path(self.parts_dir) if self.parts_dir else Path(self.output + ".parts")

    def engine_config(self, device: str) -> EngineConfig:
        """The engine's config on ``device`` ("cpu" or "cuda")."""
        return EngineConfig(model=self.model, device=device, dtype=self.dtype,
                            attention_backend=self.attention_backend,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            max_model_len=self.max_model_len,
                            trust_remote_code=self.trust_remote_code,
                            allow_untested_model=self.allow_untested_model,
                            tensor_parallel_size=self.tensor_parallel_size,
                            lora_modules=(tuple(self.lora),) if self.lora else ())

    def fingerprint(self) -> dict:
        """What a resumed run must share with the run that wrote the parts."""
        stat = os.stat(self.input)
        sampling = dataclasses.asdict(self.sampling) if self.sampling is not None else None
        return {
            "input": str(Path(self.input).resolve()), "input_bytes": stat.st_size,
            "input_mtime_ns": stat.st_mtime_ns, "task": self.task, "model": self.model,
            "text_field": self.text_field, "id_field": self.id_field,
            "shard_size": self.shard_size, "output_format": self.output_format,
            "padded_batch_size": self.padded_batch_size, "dtype": self.dtype,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len, "pooling": self.pooling,
            "normalize": self.normalize, "sampling": _jsonable(sampling),
            "lora": _jsonable(self.lora),
        }


def _format(option: str, path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise JobConfigError(option, f"must end in {', '.join(FORMATS)}, got {path!r}")
    return FORMATS[suffix]


def _jsonable(value):
    """Tuples become lists, so a fingerprint compares equal after a JSON round trip."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
