"""Engine configuration: one frozen dataclass, validated on construction.

This module imports neither torch nor transformers, so the HTTP layer can build and
validate an ``EngineConfig`` without loading the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

DEVICES = re.compile(r"^(cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "flash_attn", "torch_varlen", "reference")
PAGED_ATTENTION_BACKENDS = ("auto", "triton", "flash_attn", "torch_paged", "gather", "reference")
TP_LOADS = ("auto", "parallel", "serial")
QUANTIZATIONS = ("fp8", "int8")  # what --quantization may name (worker/quant/)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model's dtype; fp8 = fp8_e4m3
CPU_DEFAULT_BUDGET = 8192  # tokens per bin on CPU when max_num_batched_tokens is unset
SPEC_METHODS = ("ngram", "draft")  # speculative decoding (worker/generate/speculative.py)
SPEC_METHOD_ALIASES = {"draft_model": "draft", "prompt_lookup": "ngram"}  # vLLM's names
MAX_SPECULATIVE_TOKENS = 16


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"EngineConfig.{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GrammarLimits:
    """What one constraint may cost to compile. The defaults pass normal schemas
    (hundreds of properties) and choice lists of thousands (10,000 options compile in
    under 0.2 s here), and refuse a 50,000-option choice (2.5 s) or a 5,000-property
    object (2 s, and masks up to 84 ms a step) with a 400 naming the limit."""

    max_grammar_bytes: int = 262_144  # of the constraint's text (schema JSON, regex, ...)
    max_grammar_choices: int = 10_000  # options of a choice constraint
    max_grammar_object_properties: int = 2_000  # properties one object of a JSON schema lists
    grammar_compile_timeout_s: float = 5.0  # seconds one compile may run (~14x the 0.36 s measured
    #   for the costliest shape the other limits allow: 2,000 optional properties)
    max_num_grammar_threads: int = 2  # compiles at once

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                    or (f.name != "grammar_compile_timeout_s" and not isinstance(value, int)):
                kind = "a number" if f.name == "grammar_compile_timeout_s" else "an integer"
                raise ValueError(f"engine.{f.name}: must be {kind} > 0, got {value!r}")

    @property
    def max_items_in_row(self) -> int:
        """llguidance's ``LLParserLimits.max_items_in_row``: room for ``max_grammar_choices``
        options (one item each) and ``max_grammar_object_properties`` optional properties (4)."""
        return max(self.max_grammar_choices, 4 * self.max_grammar_object_properties) + 1


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (``EngineConfig.speculative``, vLLM's ``--speculative-config``
    JSON): ``method`` "ngram" (prompt lookup: the last n tokens, n from
    ``prompt_lookup_max`` down to ``prompt_lookup_min``, matched in the prompt and output)
    or "draft" (``model``, a small causal LM of the same vocabulary, proposes with its own
    paged KV cache). ``num_speculative_tokens`` is k, the most tokens proposed per step.

    How many a sequence proposes (``worker.generate.speculative.SpecLoad``): with
    ``adaptive`` (the default), only the positions worth verifying: position j while the
    sequence's estimated acceptance a satisfies a^j >= b / (F + b), b the running
    sequences and F the step's fixed cost in tokens (``step_overhead_tokens``; None:
    measured from the engine's own steps); without, always k. None at all from
    ``disable_by_batch_size`` running sequences (vLLM's key; None: no such cut). Why:
    docs/decisions.md ("Speculation by load")."""

    method: str
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    model: str | None = None  # the draft model (method "draft")
    adaptive: bool = True
    step_overhead_tokens: float | None = None
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        field = "speculative"
        method = SPEC_METHOD_ALIASES.get(self.method, self.method)
        object.__setattr__(self, "method", method)
        check_choice(f"{field}.method", method, SPEC_METHODS)
        check_int(f"{field}.num_speculative_tokens", self.num_speculative_tokens, 1)
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"{field}.num_speculative_tokens", f"must be at most "
                              f"{MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}")
        check_int(f"{field}.prompt_lookup_min", self.prompt_lookup_min, 1)
        check_int(f"{field}.prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min)
        if self.disable_by_batch_size is not None:
            check_int(f"{field}.disable_by_batch_size", self.disable_by_batch_size, 1)
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"{field}.adaptive", f"must be a bool, got {self.adaptive!r}")
        f = self.step_overhead_tokens
        if f is not None and (isinstance(f, bool) or not isinstance(f, int | float) or f <= 0):
            raise ConfigError(f"{field}.step_overhead_tokens", f"must be a number of tokens "
                              f"> 0 or None (measured), got {f!r}")
        if method == "draft" and (not isinstance(self.model, str) or not self.model):
            raise ConfigError(f"{field}.model", "method 'draft' needs the draft model's hub "
                              f"id or local directory, got {self.model!r}")
        if method == "ngram" and self.model is not None:
            raise ConfigError(f"{field}.model", "method 'ngram' takes no model (it proposes "
                              f"from the prompt and output), got {self.model!r}")

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """From a dict (or its JSON text); None stays None. Unknown keys are refused."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConfigError("speculative", f"must be a JSON object, got {value!r} "
                                  f"({exc})") from None
        if not isinstance(value, dict):
            raise ConfigError("speculative", f"must be an object with 'method' and "
                              f"'num_speculative_tokens', got {value!r}")
        value = dict(value)
        if "method" not in value and value.get("model"):
            value["method"] = "draft"  # vLLM: a model and no method is a draft model
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative.{unknown[0]}", f"unknown key; the keys are "
                              f"{', '.join(sorted(known))}")
        if "method" not in value:
            raise ConfigError("speculative.method", f"missing; one of {', '.join(SPEC_METHODS)}")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    """What one per-GPU engine serves and under which limits.

    ``None`` fields are resolved by the engine once the model is loaded (see
    ``Engine.config`` for the resolved copy): ``max_num_batched_tokens`` is
    ``CPU_DEFAULT_BUDGET`` on CPU and measured by the Phase-0 probe on CUDA;
    ``max_model_len`` is the model's ``max_position_embeddings``.
    """

    model: str  # hub id or local directory
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # auto: float32 on CPU; the checkpoint's half dtype (else bf16) on CUDA
    attention_backend: str = "auto"  # auto: flash_attn > torch_varlen (CUDA) > reference
    max_num_batched_tokens: int | None = None  # token budget per bin (aligned tokens)
    max_num_seqs: int = 0  # sequences per bin; 0 = no cap
    max_num_bins_per_step: int = 4  # bins one step schedules (the overlap window)
    align: int = 16  # lengths round up to a multiple of this when packing
    max_model_len: int | None = None  # longest sequence accepted
    trust_remote_code: bool = False
    allow_untested_model: bool = False  # load a family (or rotary type, remote code) the
    #   family matrix has not proven (worker/models/families.py); one WARNING, unchecked
    # Generation (continuous batching over a paged KV cache; see worker/generate/generation.py):
    kv_block_size: int | None = None  # tokens per KV block; None: 256 when
    #   paged_attention_backend names flash_attn or torch_paged (they need a multiple of
    #   256), else 16
    num_kv_blocks: int | None = None  # None: sized from the probe (CUDA) or a cap (CPU)
    max_num_running_seqs: int = 256  # sequences generating at once (each holds KV blocks)
    max_prefill_chunk: int = 0  # prefill tokens per request per step; 0 = the step budget
    paged_attention_backend: str = "auto"  # auto: triton > flash_attn > torch_paged >
    #   gather on CUDA (the first that runs and passes its self-check), reference on CPU
    cuda_graphs: bool = True  # decode-only steps replay CUDA graphs (CUDA only; False =
    #   every step eager, vLLM's enforce_eager)
    enable_prefix_caching: bool = True  # reuse the KV of full blocks seen before (vLLM's
    #   automatic prefix caching, on by default as there)
    tensor_parallel_size: int = 1  # ranks of one replica, one process (and GPU) each: rank 0
    #   schedules, the others follow its steps on their shards (worker/parallel/); generation
    #   only, for the families of worker.parallel.shard.TP_FAMILIES
    tp_load: str = "auto"  # how TP ranks read the checkpoint: "parallel" (all at once: one
    #   host copy per rank), "serial" (in turn: one host copy at a time), "auto" (serial when
    #   the node's available memory cannot hold one copy per rank)
    tp_step_timeout_s: float = 60.0  # a step's collectives wait this long for a hung rank,
    #   then the engine dies (its requests fail; Serve restarts the replica). Idle waits
    #   between steps are unbounded (worker/parallel/group.py)
    # LoRA adapters (worker/lora/): rows of many adapters and of the base model per step.
    enable_lora: bool = False  # wrap the targeted linear layers with adapter slots
    max_loras: int = 8  # adapters resident at once (slots; a step holds at most this many)
    max_lora_rank: int = 64  # the largest adapter rank accepted (slots are this wide)
    max_cpu_loras: int | None = None  # adapters kept read in host memory (None: 4 x max_loras)
    lora_modules: tuple = ()  # (name, path) pairs registered at start (enable_lora implied)
    # Quantization (worker/quant/): a checkpoint's own FP8 format is detected from its
    # config.json whatever this says; "fp8" quantizes a bf16/fp32 checkpoint's linear layers
    # at load (per-channel weight scales, dynamic per-token activation scales); "int8" runs
    # an encoder's linear layers as dynamic int8 on CPU.
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # "fp8" (e4m3 with scales): half the bytes per KV token
    # Speculative decoding (SpeculativeConfig's keys, as vLLM's --speculative-config JSON):
    # {"method": "ngram" | "draft", "num_speculative_tokens": k, ...} (a dict or its JSON
    # text, held parsed as a SpeculativeConfig); None: off.
    speculative: dict | None = None
    # Structured outputs: what one constraint may cost to compile (GrammarLimits; a
    # constraint over a limit is a 400 naming it):
    max_grammar_bytes: int = 262_144  # of the constraint's text (schema JSON, regex, ...)
    max_grammar_choices: int = 10_000  # options of a choice constraint
    max_grammar_object_properties: int = 2_000  # properties of one object in a JSON schema
    grammar_compile_timeout_s: float = 5.0  # seconds one compile may run

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model", f"must be a hub id or a local path, got {self.model!r}")
        if not isinstance(self.device, str) or not DEVICES.match(self.device):
            raise ConfigError("device", f"must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        check_int("align", self.align, 1)
        check_int("max_num_seqs", self.max_num_seqs, 0)
        check_int("max_num_bins_per_step", self.max_num_bins_per_step, 1)
        if self.max_num_batched_tokens is not None:
            check_int("max_num_batched_tokens", self.max_num_batched_tokens, self.align)
            if self.max_num_batched_tokens % self.align:
                raise ConfigError(
                    "max_num_batched_tokens",
                    f"must be a multiple of align ({self.align}), "
                    f"got {self.max_num_batched_tokens}",
                )
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, 1)
        for name in ("trust_remote_code", "allow_untested_model"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be a bool, got {getattr(self, name)!r}")
        check_int("max_num_running_seqs", self.max_num_running_seqs, 1)
        check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.tensor_parallel_size > 1 and re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError("tensor_parallel_size", f"takes device 'cuda' (rank r runs on "
                              f"cuda:r), not one GPU ({self.device!r})")
        if (isinstance(self.tp_step_timeout_s, bool)
                or not isinstance(self.tp_step_timeout_s, int | float)
                or not self.tp_step_timeout_s > 0):
            raise ConfigError("tp_step_timeout_s", f"must be a number of seconds > 0, got "
                              f"{self.tp_step_timeout_s!r}")
        check_choice("tp_load", self.tp_load, TP_LOADS)
        check_int("max_prefill_chunk", self.max_prefill_chunk, 0)
        check_choice("paged_attention_backend", self.paged_attention_backend,
                     PAGED_ATTENTION_BACKENDS)
        for name in ("cuda_graphs", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be a bool, got {getattr(self, name)!r}")
        if self.kv_block_size is not None and self.kv_block_size % 16 and \
                self.paged_attention_backend == "triton":
            raise ConfigError("kv_block_size", "must be a multiple of 16 for the triton "
                              f"paged attention backend, got {self.kv_block_size}")
        for name in ("kv_block_size", "num_kv_blocks"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        self._check_lora()
        if self.quantization is not None:
            check_choice("quantization", self.quantization, QUANTIZATIONS)
        if self.quantization == "int8" and self.is_cuda:
            raise ConfigError("quantization", "'int8' runs encoders on CPU; on CUDA use 'fp8'")
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        self._check_speculative()
        try:
            self.grammar_limits
        except ValueError as exc:
            name, _, message = str(exc).removeprefix("engine.").partition(": ")
            raise ConfigError(name, message) from None
        if self.device == "cpu" and self.attention_backend in ("flash_attn", "torch_varlen"):
            raise ConfigError(
                "attention_backend",
                f"{self.attention_backend!r} runs only on CUDA; use 'reference' or 'auto' on CPU",
            )

    def _check_lora(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise ConfigError("enable_lora", f"must be a bool, got {self.enable_lora!r}")
        check_int("max_loras", self.max_loras, 1)
        check_int("max_lora_rank", self.max_lora_rank, 1)
        if self.max_cpu_loras is not None:
            check_int("max_cpu_loras", self.max_cpu_loras, self.max_loras)
        modules = self.lora_modules
        if isinstance(modules, dict):
            object.__setattr__(self, "lora_modules", modules := tuple(modules.items()))
        if not isinstance(modules, tuple | list) or not all(
                isinstance(m, tuple | list) and len(m) == 2 and all(isinstance(v, str) and v
                                                                    for v in m)
                for m in modules):
            raise ConfigError("lora_modules", f"must be (name, path) pairs, got {modules!r}")
        object.__setattr__(self, "lora_modules", tuple(tuple(m) for m in modules))
        names = [m[0] for m in self.lora_modules]
        if len(set(names)) != len(names):
            raise ConfigError("lora_modules", f"names must be distinct, got {names}")
        if self.lora_modules and not self.enable_lora:
            object.__setattr__(self, "enable_lora", True)
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ConfigError("enable_lora", "LoRA adapters are not served under tensor "
                              "parallelism yet (tensor_parallel_size="
                              f"{self.tensor_parallel_size}); serve them on one device")

    def _check_speculative(self) -> None:
        spec = SpeculativeConfig.parse(self.speculative)  # kept parsed: hashable, checked
        object.__setattr__(self, "speculative", spec)
        if spec is not None and self.tensor_parallel_size > 1:
            raise ConfigError("speculative", "speculative decoding is not served under "
                              f"tensor parallelism yet (tensor_parallel_size="
                              f"{self.tensor_parallel_size}); serve it on one device")

    @property
    def lora_host_slots(self) -> int:
        """Adapters kept read in host memory."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else 4 * self.max_loras

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def grammar_limits(self) -> GrammarLimits:
        """The ``GrammarLimits`` these fields make."""
        return GrammarLimits(self.max_grammar_bytes, self.max_grammar_choices,
                             self.max_grammar_object_properties,
                             self.grammar_compile_timeout_s)


def check_choice(field: str, value, choices: tuple[str, ...], error=ConfigError) -> None:
    """Raise ``error(field, message)`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise error(field, f"must be one of {', '.join(choices)}; got {value!r}")


def check_int(field: str, value, minimum: int, error=ConfigError) -> None:
    """Raise ``error(field, message)`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(field, f"must be an integer >= {minimum}, got {value!r}")
