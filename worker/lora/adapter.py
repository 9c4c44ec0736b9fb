"""A LoRA adapter on local disk, in PEFT's format: what it is, checked before it loads.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors``,
whose keys name the base model's modules::

    base_model.model.<module path>.lora_A.weight   [r, in_features]
    base_model.model.<module path>.lora_B.weight   [out_features, r]

and the layer computes ``y = W x + scaling * B (A x)`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` give
some modules their own ``r`` and ``alpha``).

What is served, and what is refused by name (``LoRAError``, a 400 at the edge), because no
test proves it here: a rank above ``max_lora_rank``; DoRA (``use_dora``); trained biases
(``bias`` other than ``"none"``); ``modules_to_save`` (whole modules fine-tuned: not an
adapter on the shared base); ``fan_in_fan_out`` (GPT-2's Conv1D); embedding LoRA
(``lora_embedding_A``); a module outside ``TARGETS``; the pickled ``adapter_model.bin``
(arbitrary code on load: convert it to safetensors); and a module whose shapes differ
from the base model's (an adapter of another base).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from worker.core.errors import InvalidRequestError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The linear layers an adapter may target: each decoder layer's projections, and the LM
# head (PEFT allows it; its rows are the sampled ones).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "lm_head")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class LoRAError(InvalidRequestError):
    """An adapter that cannot be served as given (its path, config, rank, modules)."""

    def __init__(self, name: str, message: str, *, limit=None, value=None,
                 setting: str = "lora_path"):
        super().__init__(f"LoRA adapter {name!r}: {message}", limit=limit, value=value,
                         setting=setting)
        self.adapter = name


@dataclass(frozen=True)
class ModuleLoRA:
    """One targeted module of an adapter."""

    module: str  # the module's path in the loaded model ("model.layers.0.self_attn.q_proj")
    rank: int
    scaling: float
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter: everything but its weights (read when it is loaded)."""

    name: str
    path: str
    rank: int  # the largest of its modules' ranks
    modules: tuple[ModuleLoRA, ...]
    base_model: str  # base_model_name_or_path as PEFT wrote it ("" when absent)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Distinct projection names it targets (``q_proj``, ...), sorted."""
        return tuple(sorted({m.module.rsplit(".", 1)[-1] for m in self.modules}))

    @property
    def weights_path(self) -> str:
        return os.path.join(self.path, WEIGHTS_FILE)


def read_adapter(name: str, path: str, max_lora_rank: int,
                 shapes: dict[str, tuple[int, int]] | None = None) -> AdapterSpec:
    """Check the adapter at ``path`` without reading its weights (the safetensors header
    only); ``shapes``: the base model's target modules, ``module -> (in, out)``, to check
    it against (None: not checked). Raises ``LoRAError`` naming what is wrong."""
    if not isinstance(path, str) or not path:
        raise LoRAError(name, f"lora_path must be a local directory, got {path!r}", value=path)
    if not os.path.isdir(path):
        raise LoRAError(name, f"no directory at lora_path {path!r}", value=path)
    config = _read_config(name, path)
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise LoRAError(name, "only adapter_model.safetensors is loaded; "
                            "adapter_model.bin is a pickle (it can run code when read): "
                            "save the adapter with safe_serialization=True", value=path)
        raise LoRAError(name, f"{WEIGHTS_FILE} is missing in {path!r}", value=path)
    tensors = _header_shapes(name, weights)
    modules = _modules(name, config, tensors, max_lora_rank, shapes)
    return AdapterSpec(name, os.path.abspath(path), max(m.rank for m in modules),
                       tuple(modules), str(config.get("base_model_name_or_path") or ""))


def _read_config(name: str, path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise LoRAError(name, f"{CONFIG_FILE} is missing in {path!r}", value=path) from None
    except (OSError, ValueError) as exc:
        raise LoRAError(name, f"{CONFIG_FILE} cannot be read: {exc}", value=path) from None
    if not isinstance(config, dict):
        raise LoRAError(name, f"{CONFIG_FILE} must hold a JSON object", value=path)
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise LoRAError(name, f"peft_type must be LORA, got {config.get('peft_type')!r}",
                        value=config.get("peft_type"), setting="peft_type")
    refusals = (("use_dora", bool(config.get("use_dora")), "DoRA adapters are not served"),
                ("bias", config.get("bias", "none") not in (None, "none"),
                 "adapters with trained biases are not served"),
                ("modules_to_save", bool(config.get("modules_to_save")),
                 ("adapters that fine-tune whole modules (modules_to_save) are not served: "
                  "they are not an adapter on the shared base")),
                ("fan_in_fan_out", bool(config.get("fan_in_fan_out")),
                 "fan_in_fan_out (Conv1D layers) is not served"))
    for field, refused, why in refusals:
        if refused:
            raise LoRAError(name, f"{why} ({field}={config.get(field)!r})",
                            value=config.get(field), setting=field)
    return config


def _header_shapes(name: str, file: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the adapter's fault
        raise LoRAError(name, f"{WEIGHTS_FILE} cannot be read: {exc}", value=file) from None


def _modules(name: str, config: dict, tensors: dict, max_rank: int,
             shapes: dict[str, tuple[int, int]] | None) -> list[ModuleLoRA]:
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in tensors.items():  # per tensor of the adapter
        if "lora_embedding" in key:
            raise LoRAError(name, f"embedding LoRA ({key}) is not served", value=key,
                            setting="target_modules")
        if ".base_layer." in key:
            raise LoRAError(name, f"it holds a base layer's own weights ({key}): PEFT saves "
                            "them with save_embedding_layers, for a resized vocabulary, which "
                            "is not served; save it with save_embedding_layers=False",
                            value=key, setting="save_embedding_layers")
        m = _KEY.match(key.removeprefix(PREFIX))
        if m is None:
            raise LoRAError(name, f"tensor {key!r} is not a LoRA A or B weight (only LoRA "
                            f"on {', '.join(TARGETS)} is served)", value=key,
                            setting="target_modules")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    if not pairs:
        raise LoRAError(name, f"{WEIGHTS_FILE} holds no LoRA weights", value=0)
    r0, alpha0 = int(config.get("r") or 8), float(config.get("lora_alpha") or 8)
    rslora = bool(config.get("use_rslora"))
    modules = []
    for module, ab in sorted(pairs.items()):  # per targeted module
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in TARGETS:
            raise LoRAError(name, f"module {module!r} is not a supported target (supported: "
                            f"{', '.join(TARGETS)})", value=module, setting="target_modules")
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2:
            raise LoRAError(name, f"module {module!r} needs a 2-D lora_A and lora_B, got "
                            f"{ab}", value=module)
        (rank, d_in), (d_out, rank_b) = ab["A"], ab["B"]
        if rank != rank_b or rank < 1:
            raise LoRAError(name, f"module {module!r}: lora_A has rank {rank} and lora_B "
                            f"{rank_b}", value=module)
        if rank > max_rank:
            raise LoRAError(name, f"rank {rank} (module {module!r}) is above "
                            f"max_lora_rank={max_rank}; raise max_lora_rank", limit=max_rank,
                            value=rank, setting="max_lora_rank")
        if shapes is not None:
            base = shapes.get(module)
            if base is None:
                raise LoRAError(name, f"module {module!r} is not in the base model (an "
                                "adapter of another model?)", value=module,
                                setting="target_modules")
            if base != (d_in, d_out):
                raise LoRAError(name, f"module {module!r} is {d_in} -> {d_out}, the base "
                                f"model's is {base[0]} -> {base[1]} (an adapter of another "
                                "model?)", value=(d_in, d_out), setting="lora_path")
        alpha = float(_pattern(config.get("alpha_pattern"), module, alpha0))
        expected = int(_pattern(config.get("rank_pattern"), module, r0))
        if expected != rank:
            raise LoRAError(name, f"module {module!r} has rank {rank} but its config says "
                            f"{expected}", value=rank, setting="r")
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules.append(ModuleLoRA(module, rank, scaling, d_in, d_out))
    return modules


def _pattern(patterns, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the first key that matches the end of
    the module's path (PEFT's own rule: ``re.match(rf"(.*\\.)?{key}$", module)``)."""
    for key, value in (patterns or {}).items():  # per pattern (a handful)
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
