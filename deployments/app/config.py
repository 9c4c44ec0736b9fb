"""The application's arguments (the ``args:`` of a Serve config), validated strictly.

Ray's ``ServeDeploySchema`` ignores unknown keys; ours refuse them with a message that
names the key and where it sits, so a typo (``max_num_batch_tokens``) fails at deploy
time instead of silently running with the default. The engine's own settings are not
redeclared here: ``EngineArgs`` is generated from ``worker.EngineConfig``'s fields, and
``EngineConfig`` validates their values. Every environment variable the serving layer
reads is read in this module (``env_api_key``).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from deployments.admission.ledger import LeaseRule
from worker.core.config import ConfigError, EngineConfig

API_KEY_ENV = "PACKSERVE_API_KEY"
DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_PROMPT_CHARS = 1 << 20
SERVE_METRICS_INTERVAL_S = 10.0  # Serve's default replica metrics push period


class AppConfigError(ValueError):
    """The application's arguments are invalid; the message names each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _engine_args_model() -> type[BaseModel]:
    """A strict pydantic model with every ``EngineConfig`` field but ``model``, all
    optional: an unset field keeps the engine's default (or the replica's, for device)."""
    hints = typing.get_type_hints(EngineConfig)
    fields = {f.name: (hints[f.name] | None, None)
              for f in dataclasses.fields(EngineConfig) if f.name != "model"}
    return create_model("EngineArgs", __base__=_Strict, **fields)


EngineArgs = _engine_args_model()


class AutoscalingArgs(_Strict):
    """Token-aware autoscaling of a model's replicas (see deployments/replica/autoscaling.py)."""

    min_replicas: int = Field(1, ge=1)  # >= 1: with none, admission answers 503, not a queue
    max_replicas: int = Field(ge=1)
    target_token_utilization: float = Field(0.7, gt=0, le=1)  # of the measured capacity
    upscale_delay_s: float = Field(10.0, ge=0)  # demand must stay high this long
    downscale_delay_s: float = Field(120.0, ge=0)  # demand must stay low this long
    look_back_period_s: float = Field(30.0, gt=0)  # token use is averaged over this window
    metrics_interval_s: float | None = Field(None, gt=0)  # replica push period; None: Serve's

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= "
                             f"max_replicas ({self.max_replicas})")
        interval = self.metrics_interval_s or SERVE_METRICS_INTERVAL_S
        if self.look_back_period_s <= interval:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be > "
                             f"metrics_interval_s ({interval}): Serve averages over the window")
        return self


class LoRAArgs(_Strict):
    """A LoRA adapter served on its model's replicas (a PEFT directory on each node)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._/-]+$")  # the model id clients send
    path: str = Field(min_length=1)


class ModelArgs(_Strict):
    """One served model: a Serve deployment of ``num_replicas`` engine replicas."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")  # the id clients send
    model: str = Field(min_length=1)  # hub id, local dir, packaged:NAME or smoke:decoder
    num_replicas: int = Field(1, ge=1)  # one per GPU on GPU nodes
    num_gpus: float = Field(0, ge=0)  # per replica: 1 on GPU nodes, 0 on CPU
    num_cpus: float = Field(0, ge=0)  # per replica; 0 so small machines can place them
    # torch's threads in a CPU replica; None: num_cpus when >= 1, else every core this
    # process may run on (Ray sets OMP_NUM_THREADS=1 in an actor of num_cpus 0, which left a
    # CPU replica on one thread while the in-process engine used all of them)
    cpu_threads: int | None = Field(None, ge=1)
    max_ongoing_requests: int = Field(1024, ge=1)  # Serve's per-replica cap (a backstop)
    pooling: Literal["mean", "last", "cls"] | None = None  # embeddings; None: model default
    normalize: bool = True  # embeddings are unit vectors, as OpenAI's are
    engine: EngineArgs = Field(default_factory=EngineArgs)  # type: ignore[valid-type]
    autoscaling: AutoscalingArgs | None = None  # None: a fixed num_replicas
    # LoRA adapters on this model (engine.enable_lora implied; engine.max_loras and
    # max_lora_rank bound them); clients name one as ``model`` or ``"<name>:<adapter>"``
    loras: list[LoRAArgs] = Field(default_factory=list)

    @model_validator(mode="after")
    def _engine_config_valid(self) -> ModelArgs:
        names = [a.name for a in self.loras]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"loras[].name must be unique; repeated: {', '.join(dupes)}")
        self.engine_config()
        tp = self.engine.tensor_parallel_size or 1
        if tp > 1 and self.num_gpus and self.num_gpus != tp:
            raise ValueError(f"num_gpus ({self.num_gpus:g}) must equal engine."
                             f"tensor_parallel_size ({tp}): a GPU replica holds one GPU per "
                             "rank (or 0 for ranks on the CPU)")
        if self.autoscaling is not None and self.num_replicas > 1:
            raise ValueError(f"num_replicas ({self.num_replicas}) and autoscaling exclude each "
                             "other: remove num_replicas (autoscaling.min_replicas and "
                             "max_replicas bound the replicas)")
        return self

    def torch_threads(self) -> int:
        """The intra-op threads a CPU replica runs torch with (see ``cpu_threads``)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        if self.num_cpus >= 1:
            return int(self.num_cpus)
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)

    def engine_config(self) -> EngineConfig:
        """The replica's ``EngineConfig``: CUDA when the replica holds a GPU, else CPU."""
        overrides = {k: v for k, v in self.engine.model_dump().items() if v is not None}
        overrides.setdefault("device", "cuda" if self.num_gpus >= 1 else "cpu")
        if self.loras:
            declared = tuple(tuple(m) for m in overrides.get("lora_modules") or ())
            overrides["lora_modules"] = declared + tuple((a.name, a.path) for a in self.loras)
        try:
            return EngineConfig(model=self.model, **overrides)
        except ConfigError as exc:
            detail = str(exc).removeprefix(f"EngineConfig.{exc.field}: ")
            raise ValueError(f"engine.{exc.field}: {detail}") from None


class AdmissionArgs(_Strict):
    """The global admission controller (see deployments/admission/controller.py)."""

    enabled: bool = True
    capacity_fraction: float = Field(1.0, gt=0, le=1)  # of the replicas' measured capacity
    max_wait_s: float = Field(0.0, ge=0, le=600)  # wait this long for room before a 429
    retry_after_min_s: int = Field(1, ge=1)
    retry_after_max_s: int = Field(30, ge=1)
    drain_window_s: float = Field(10.0, gt=0)  # the drain rate behind Retry-After
    heartbeat_s: float = Field(1.0, gt=0)  # replicas and ingresses report this often
    replica_timeout_s: float = Field(5.0, gt=0)  # silent this long: capacity and leases gone
    holder_timeout_s: float = Field(15.0, gt=0)  # an ingress silent this long: leases reclaimed
    # A generation's lease: prompt + first_output_tokens, then one block ahead of its use,
    # up to prompt + max_tokens (deployments/admission/ledger.py LeaseRule; docs/decisions.md).
    # lease_rule "ceiling" leases prompt + max_tokens from the start (the rule before).
    lease_rule: Literal["use", "ceiling"] = "use"
    first_output_tokens: int = Field(256, ge=1)
    lease_block_tokens: int = Field(64, ge=1)
    # Speculative decoding by cluster load (deployments/admission/speculation.py): off on
    # every replica of a model while its pool's reserved / capacity is at or above the
    # first, on again once it is below the second (replicas without speculation ignore it)
    speculation_off_utilization: float = Field(0.85, gt=0, le=1)
    speculation_on_utilization: float = Field(0.6, ge=0, lt=1)

    @model_validator(mode="after")
    def _speculation_hysteresis(self) -> AdmissionArgs:
        if self.speculation_on_utilization >= self.speculation_off_utilization:
            raise ValueError(
                f"speculation_on_utilization ({self.speculation_on_utilization}) must be < "
                f"speculation_off_utilization ({self.speculation_off_utilization})")
        return self

    def make_lease_rule(self) -> LeaseRule:
        return LeaseRule(self.first_output_tokens, self.lease_block_tokens,
                         follow_use=self.lease_rule == "use")


class HTTPArgs(_Strict):
    """The OpenAI-compatible ingress."""

    api_key: str | None = None  # Bearer key; PACKSERVE_API_KEY overrides; None: no auth
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    # characters of text per request (a prompt, all messages, all embedding inputs),
    # refused before any tokenizing
    max_prompt_chars: int = Field(DEFAULT_MAX_PROMPT_CHARS, ge=1)
    max_embedding_inputs: int = Field(2048, ge=1)  # per request, as OpenAI caps it
    tokenizer_threads: int = Field(2, ge=1)  # large inputs are tokenized here, off the loop
    # how tokens travel from replicas to the ingress (deployments/http/streaming.py)
    stream_transport: Literal["channel", "serve_handle"] = "channel"
    num_replicas: int = Field(1, ge=1)  # ingress replicas (CPU only)
    max_ongoing_requests: int = Field(4096, ge=1)  # per ingress replica (Serve's default: 5)
    # Slow and hostile clients (deployments/http/guards.py and uvicorn_guard.py; HAProxy's
    # config in throughput mode, deployments/app/haproxy_guard.py). Each is enforced in both
    # modes unless noted.
    header_timeout_s: float = Field(10.0, gt=0, le=3600)  # request line + headers: else 408
    body_timeout_s: float = Field(10.0, gt=0, le=3600)  # wait per body chunk: else 408
    # the whole body must come at least this fast (after body_timeout_s): else 408
    min_body_rate_bytes_s: int = Field(65536, ge=1)
    max_header_bytes: int = Field(16384, ge=1024, le=1 << 20)  # request line + headers: 431
    max_connections: int = Field(4096, ge=16)  # open client connections (HAProxy maxconn)
    max_connections_per_client: int = Field(256, ge=1)  # per source address
    # on stop (Ctrl-C, SIGTERM, Serve stopping the ingress): in-flight requests get this long
    # to finish, then streams end with an error event and [DONE]
    drain_timeout_s: float = Field(30.0, ge=0, le=3600)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; off as there: anyone
    # with the API key could make replicas read a path)
    lora_runtime_updates: bool = False

    @model_validator(mode="after")
    def _connection_caps(self) -> HTTPArgs:
        if self.lora_runtime_updates and self.num_replicas > 1:
            raise ValueError("lora_runtime_updates needs http.num_replicas 1 (the adapters "
                             f"loaded at run time live in the ingress), got {self.num_replicas};"
                             " declare adapters in models[].loras instead")
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(f"max_connections_per_client ({self.max_connections_per_client})"
                             f" must be <= max_connections ({self.max_connections})")
        return self


class RouterArgs(_Strict):
    """How requests pick a replica of a model."""

    policy: Literal["prefix_aware", "free_budget", "power_of_two"] = "prefix_aware"
    stats_period_s: float = Field(0.5, gt=0)  # record_routing_stats period
    # prefix_aware: the replica with the longest recently routed prefix wins while its free
    # tokens are at least this fraction of the most free replica's
    prefix_min_free_fraction: float = Field(0.5, ge=0, le=1)
    prefix_ttl_s: float = Field(600.0, gt=0)  # a routed prefix is forgotten after this
    # prefix_aware, a LoRA adapter's request: a replica that holds the adapter (reported
    # resident, or routed it within prefix_ttl_s) wins while its free tokens are at least
    # this fraction of the most free replica's
    lora_min_free_fraction: float = Field(0.5, ge=0, le=1)
    prefix_max_entries: int = Field(100_000, ge=1)  # prompt chunks remembered per replica


class AppArgs(_Strict):
    """``build_app``'s arguments: ``applications[].args`` in cluster/*.yaml."""

    models: list[ModelArgs] = Field(min_length=1)
    admission: AdmissionArgs = Field(default_factory=AdmissionArgs)
    http: HTTPArgs = Field(default_factory=HTTPArgs)
    router: RouterArgs = Field(default_factory=RouterArgs)

    @model_validator(mode="after")
    def _unique_names(self) -> AppArgs:
        names = [m.name for m in self.models] + [a.name for m in self.models for a in m.loras]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError("models[].name and models[].loras[].name must be unique; "
                             f"repeated: {', '.join(dupes)}")
        if self.admission.retry_after_min_s > self.admission.retry_after_max_s:
            raise ValueError(
                f"admission.retry_after_min_s ({self.admission.retry_after_min_s}) must be <= "
                f"admission.retry_after_max_s ({self.admission.retry_after_max_s})")
        return self

    @classmethod
    def parse(cls, args: dict | AppArgs | None) -> AppArgs:
        """Validate ``args``; raise ``AppConfigError`` naming every bad key."""
        if isinstance(args, AppArgs):
            return args
        try:
            return cls.model_validate(args or {})
        except ValidationError as exc:
            raise AppConfigError(format_errors(exc, "args")) from None

    def api_key(self) -> str | None:
        return env_api_key() or self.http.api_key

    def model(self, name: str) -> ModelArgs:
        return next(m for m in self.models if m.name == name)


def env_api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def format_errors(exc: ValidationError, root: str) -> str:
    """One line per error: ``args.models[0].engine.max_num_batch_tokens: unknown key``."""
    lines = []
    for err in exc.errors():
        where = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key (check its spelling; see README's configuration)")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            lines.append(f"{where}: {msg}" + ("" if isinstance(value, dict) else f" (got {value!r})"))
    return "invalid packserve configuration:\n  " + "\n  ".join(lines)
