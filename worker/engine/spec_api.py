"""Speculative decoding at the engine: the draft model's load and checks, the cluster's cap.

The draft model (``speculative.method = "draft"``) is loaded before the memory plan,
like the target (same device and dtype, our paged attention registered), so the probe
measures with its weights resident and the plan counts its KV cache
(``worker.generate.draft``: one block of the draft's per block of the target's). What it
must share with the target is checked here and refused by name: a causal LM, a
vocabulary no larger than the target's with the same tokens where both have a tokenizer,
positions for ``max_model_len``, and no FP8 KV cache (not proven with a draft).
"""

from __future__ import annotations

import dataclasses
import logging

from worker.core.config import ConfigError, EngineConfig

logger = logging.getLogger(__name__)


def load_draft(config: EngineConfig, device, target_spec, max_model_len: int):
    """The draft model of ``config.speculative`` (None unless its method is "draft")."""
    spec = config.speculative
    if spec is None or spec.method != "draft":
        return None
    if config.kv_cache_dtype != "auto":
        raise ConfigError("speculative", f"a draft model with kv_cache_dtype="
                          f"{config.kv_cache_dtype!r} is not supported yet; use "
                          "kv_cache_dtype='auto' or method 'ngram'")
    from worker.models.loader import load_model

    draft_config = dataclasses.replace(
        config, model=spec.model, speculative=None, quantization=None, enable_lora=False,
        lora_modules=(), tensor_parallel_size=1, max_model_len=None,
        dtype=str(target_spec.dtype).removeprefix("torch."))
    model, draft_spec = load_model(draft_config, device.device)
    if not draft_spec.is_decoder or draft_spec.is_classifier:
        raise ConfigError("speculative.model", f"{spec.model!r} is not a causal LM")
    if draft_spec.vocab_size > target_spec.vocab_size:
        raise ConfigError("speculative.model", f"the draft's vocabulary ({draft_spec.vocab_size}"
                          f" tokens) is larger than the target's ({target_spec.vocab_size})")
    positions = draft_spec.max_position_embeddings
    if positions is not None and positions < max_model_len:
        raise ConfigError("speculative.model", f"the draft holds {positions} positions, fewer "
                          f"than max_model_len={max_model_len}; lower max_model_len")
    _check_tokenizers(config.model, spec.model)
    logger.info("speculative decoding: draft model %s (%d tokens of vocabulary), k=%d",
                spec.model, draft_spec.vocab_size, spec.num_speculative_tokens)
    return model


def _check_tokenizers(target: str, draft: str) -> None:
    """Both tokenizers, when both load, must map the same strings to the same ids."""
    from transformers import AutoTokenizer

    from worker.models.sources import resolve_model

    try:
        a = AutoTokenizer.from_pretrained(resolve_model(target))
        b = AutoTokenizer.from_pretrained(resolve_model(draft))
    except (OSError, ValueError, TypeError):
        return  # a model without a tokenizer: the vocabulary sizes were checked
    va, vb = a.get_vocab(), b.get_vocab()
    if any(va.get(tok) != i for tok, i in vb.items()):
        raise ConfigError("speculative.model", f"the draft {draft!r} does not share the "
                          f"target's tokenizer (its token ids differ)")


class SpecAPI:
    """Speculation methods of ``Engine`` (which provides ``_gen`` and the step lock)."""

    _spec_cap: int | None = None

    def set_speculation_cap(self, cap: int | None) -> None:
        """Cap the tokens a sequence may propose (0: speculation off; None: the load rule
        alone): the replica relays the admission controller's cluster view. Thread-safe;
        a no-op on an engine without speculation."""
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"speculation cap must be an integer >= 0 or None, got {cap!r}")
        self._spec_cap = cap
        gen = self._gen
        if gen is not None:
            gen.set_speculation_cap(cap)
