"""Tiny PEFT LoRA adapters, made with ``peft`` itself and saved in its format.

PEFT initialises ``lora_B`` to zero (an adapter that changes nothing); these draw both A
and B at random and large enough that every adapter changes the greedy tokens, so a row
run with the wrong adapter (or none) shows.
"""

from __future__ import annotations

from pathlib import Path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, directory: Path, *, r: int = 8, alpha: float = 16,
                 targets=("q_proj", "v_proj"), seed: int = 0, scale: float = 0.3,
                 **config) -> Path:
    """A random LoRA of rank ``r`` on ``targets`` of the checkpoint at ``base``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            lora_dropout=0.0, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():  # per LoRA weight
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft.save_pretrained(directory, save_embedding_layers=False)  # the base's head: unchanged
    return Path(directory)


def merged_model(base: Path, adapter: Path):
    """The base model with ``adapter`` merged into its weights (PEFT's own merge), fp32,
    eager attention: the oracle an adapter's rows must equal."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation="eager")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
