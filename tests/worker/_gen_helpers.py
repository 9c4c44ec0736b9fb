"""Helpers for the generation tests: engines that are checked for leaked KV blocks on
teardown, HF ``generate`` as the oracle, and a word-level tokenizer for text tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.factories import VOCAB


def hf_greedy(model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """HF ``generate`` on one prompt alone: greedy, no padding (an explicit all-ones
    mask, so a prompt token equal to the pad id is not masked out)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(prompt):].tolist()


def with_generation_config(src: Path, dst: Path, **fields) -> Path:
    """A copy of checkpoint ``src`` whose generation_config.json has ``fields`` set."""
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.update(fields)
    path.write_text(json.dumps(config))
    return dst


def add_word_tokenizer(directory: Path) -> Path:
    """Save a word-level tokenizer over the tiny vocab: token i is ``w{i}``, ids 0-2 are
    the special ``<unk>``, ``<s>``, ``</s>``; decoding joins words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(directory)
    return directory
