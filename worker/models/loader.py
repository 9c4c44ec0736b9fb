"""Load a Hugging Face checkpoint for packed forwards.

Decoders (Llama, Qwen2, Mistral, ...) load with ``AutoModelForCausalLM`` (the LM head
serves ``score``; ``embed`` runs only the base model), encoders (BERT family) with
``AutoModel``, and ``*ForSequenceClassification`` checkpoints (either kind) with
``AutoModelForSequenceClassification`` (the head serves ``classify``; ``embed`` still
runs only the base model). The attention implementation is our registered varlen
backend, so transformers never builds a dense mask.

Before anything loads, a family (or rotary type, or remote code) the family matrix has
not proven is refused by name (``worker.models.families``) unless the config allows
untested models; once loaded, one tiny packed forward proves that every attention layer
and the LM head run the way the runners drive them (``worker.models.proof``).

RoBERTa-family encoders number positions from ``padding_idx + 1`` (their embeddings do
it when no ``position_ids`` are given); the packed forward passes positions that restart
at 0 per sequence, so the spec carries that offset and the runner adds it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from worker.attention.packed import attention_softcap, register, select_backend
from worker.core.config import ConfigError, EngineConfig
from worker.models.families import check_proven
from worker.models.labels import LabelSpec
from worker.models.moe import install_grouped_experts
from worker.models.proof import prove_model
from worker.models.sources import resolve_model
from worker.quant import load as fp8_load
from worker.quant.fp8 import select_mode

logger = logging.getLogger(__name__)

# positions start at padding_idx + 1 (transformers' create_position_ids_from_input_ids)
OFFSET_POSITION_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What the engine needs to know about the loaded model."""

    model_type: str
    is_decoder: bool  # causal LM: last-token pooling by default, can score
    hidden_size: int
    vocab_size: int  # rows of the input embedding: token ids must be below this
    max_position_embeddings: int | None
    dtype: torch.dtype
    attention_backend: str  # "flash_attn" | "torch_varlen" | "reference"
    takes_token_type_ids: bool  # BERT family: staged token types [1, T] (zeros but pairs)
    type_vocab_size: int = 0  # token types the model embeds; 0 without token types
    position_offset: int = 0  # added to the packed positions (RoBERTa: padding_idx + 1)
    labels: LabelSpec | None = None  # a *ForSequenceClassification checkpoint: classify
    unproven: tuple[str, ...] = ()  # what the family matrix has not proven (loaded only
    #   with allow_untested_model; worker/models/families.py)

    @property
    def is_classifier(self) -> bool:
        return self.labels is not None


def is_decoder(hf_config) -> bool:
    """A causal LM: marked as a decoder, named ``*ForCausalLM``, or a causal-only family."""
    if getattr(hf_config, "is_encoder_decoder", False):
        raise ConfigError("model", f"encoder-decoder models ({hf_config.model_type}) are not "
                          "supported; use a decoder-only or encoder-only checkpoint")
    if getattr(hf_config, "is_decoder", False):
        return True
    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    kind = hf_config.model_type
    causal_only = kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and causal_only


def is_classifier(hf_config) -> bool:
    archs = getattr(hf_config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def resolve_dtype(requested: str, hf_config, device_type: str) -> torch.dtype:
    """``auto``: float32 on CPU; on CUDA the checkpoint's half dtype, else bfloat16."""
    if requested != "auto":
        return _DTYPES[requested]
    if device_type != "cuda":
        return torch.float32
    saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    saved = _DTYPES.get(saved, saved) if isinstance(saved, str) else saved
    return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_model(config: EngineConfig, device: torch.device, shard=None, reading=None
               ) -> tuple[torch.nn.Module, ModelSpec]:
    """``from_pretrained`` on ``device`` in eval mode with our attention registered.
    ``shard(model)`` (a tensor-parallel rank's, worker.parallel.shard) runs on the host
    copy before anything moves to ``device``: the device receives only this rank's part.
    ``reading``: a context manager around reading, sharding and moving the weights, and
    nothing after (the ranks' turns; the load-time proof runs collectives, outside it)."""
    remote = config.trust_remote_code
    path = resolve_model(config.model)  # packaged:, smoke: specs -> a local directory
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    unproven = check_proven(hf_config, allow_untested=config.allow_untested_model,
                            trust_remote_code=remote, model=config.model)
    decoder = is_decoder(hf_config)
    dtype = resolve_dtype(config.dtype, hf_config, device.type)
    backend = select_backend(config.attention_backend, device.type, dtype,
                             softcap=attention_softcap(hf_config) is not None)
    classifier = is_classifier(hf_config)
    fp8 = fp8_load.prepare(hf_config, path, config.quantization, decoder)  # None: unquantized
    if classifier:
        auto_cls = AutoModelForSequenceClassification
    else:
        auto_cls = AutoModelForCausalLM if decoder else AutoModel
    with reading if reading is not None else contextlib.nullcontext():
        model = auto_cls.from_pretrained(
            path, config=hf_config, dtype=dtype, trust_remote_code=remote,
            attn_implementation=register(backend),
        )
        if fp8 is not None:
            fp8_load.attach_scales(model, path, fp8)
        if shard is not None:
            shard(model)
        if fp8 is not None or config.quantization == "fp8":
            fp8_load.convert(model, online=fp8 is None)
        model.to(device).eval()
    select_mode(model, device, dtype)  # FP8 layers: _scaled_mm if it passes its check here
    if config.quantization == "int8":  # dynamic int8 linear layers, encoders on CPU
        from worker.quant.int8 import quantize_int8

        quantize_int8(model, decoder=decoder, device=device)
    install_grouped_experts(model)  # MoE layers: grouped_mm if it passes its start-up check
    base = model.base_model
    embeddings = getattr(base, "embeddings", None)
    takes_types = hasattr(embeddings, "token_type_embeddings")
    spec = ModelSpec(
        model_type=hf_config.model_type,
        is_decoder=decoder,
        hidden_size=hf_config.hidden_size,
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", None),
        dtype=dtype,
        attention_backend=backend,
        takes_token_type_ids=takes_types,
        type_vocab_size=(int(embeddings.token_type_embeddings.num_embeddings)
                         if takes_types else 0),
        position_offset=position_offset(hf_config),
        labels=(LabelSpec.from_config(hf_config, "last" if decoder else "cls")
                if classifier else None),
        unproven=tuple(unproven),
    )
    prove_model(model, spec, device)
    logger.info("loaded %s (%s%s, %s, %s attention) on %s", config.model, spec.model_type,
                f" classifier of {spec.labels.num_labels} labels" if classifier else "",
                dtype, backend, device)
    return model, spec


def position_offset(hf_config) -> int:
    """Where a sequence's positions start: ``padding_idx + 1`` for the RoBERTa family."""
    if hf_config.model_type not in OFFSET_POSITION_TYPES:
        return 0
    return int(getattr(hf_config, "pad_token_id", 1) or 0) + 1
