"""Per-sequence, unpacked Hugging Face forwards: what the packed engine must reproduce."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoModelForCausalLM


def load_reference(path, decoder: bool, attn: str = "eager"):
    cls = AutoModelForCausalLM if decoder else AutoModel
    return cls.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


@torch.inference_mode()
def hidden_states(model, token_ids) -> np.ndarray:
    """Last hidden states [len, hidden] of one sequence run alone (no padding)."""
    ids = torch.tensor([token_ids])
    kwargs = dict(input_ids=ids, use_cache=False)
    base = model.base_model
    if hasattr(getattr(base, "embeddings", None), "token_type_embeddings"):
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    return base(**kwargs).last_hidden_state[0].numpy()


@torch.inference_mode()
def logits(model, token_ids) -> np.ndarray:
    """LM logits [len, vocab] of one sequence run alone."""
    return model(input_ids=torch.tensor([token_ids]), use_cache=False).logits[0].numpy()


def next_token_logprobs(model, token_ids) -> np.ndarray:
    """log p(token t | tokens < t) for t = 1..len-1, from log_softmax of the logits."""
    lp = torch.log_softmax(torch.from_numpy(logits(model, token_ids)).double(), dim=-1)
    nxt = torch.tensor(token_ids[1:], dtype=torch.long)
    return lp[:-1].gather(1, nxt[:, None])[:, 0].float().numpy()


def pool(hidden: np.ndarray, how: str) -> np.ndarray:
    return {"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[how]
