"""LoRA on a GPU (skipped without CUDA): grouped_mm passes its start-up check in bf16 (or
the engine says it fell back to the loop), and a mixed batch of adapter and base rows
gives each row the tokens it gets alone; the delta of the grouped path equals an fp32
reference. Adapters from ``benchmarks.adapters`` (the GPU machine has no peft)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.adapters import ALL_LINEAR, write_adapter
from tests.factories import token_lists
from worker.generate.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def test_mixed_adapters_on_cuda_equal_each_row_alone(tiny_model, make_engine, tmp_path):
    base = tiny_model("llama")
    paths = {f"a{i}": write_adapter(base, tmp_path / f"a{i}", r=8 * (i + 1),
                                    targets=ALL_LINEAR if i else ("q_proj", "v_proj"),
                                    seed=i, scale=0.3) for i in range(3)}
    engine = make_engine(base, device="cuda", dtype="bfloat16", max_num_batched_tokens=512,
                         lora_modules=tuple((n, str(p)) for n, p in paths.items()))
    print(f"grouped_mm on CUDA bf16: {engine.loras.grouped}")
    prompts = token_lists([9, 33, 17, 60, 5, 41], seed=2)
    loras = ["a0", None, "a1", "a2", None, "a1"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    mixed = engine.generate(prompts, params, lora=loras)
    alone = [engine.generate([p], params, lora=lo)[0] for p, lo in zip(prompts, loras)]
    same = sum(m.token_ids == a.token_ids for m, a in zip(mixed, alone))
    assert same >= 5, [(m.token_ids, a.token_ids) for m, a in zip(mixed, alone)]
    assert len({tuple(m.token_ids) for m in mixed[:4]}) >= 3  # the adapters change output


def test_grouped_delta_on_cuda_equals_fp32():
    """Both paths in bf16 on CUDA against fp32 on the CPU; grouped_mm only where its
    start-up check passes (else the engine runs the loop, which is checked)."""
    import numpy as np

    from worker.lora.layers import LoRALinear, LoRARows, check_grouped_mm, lora_delta

    layer = LoRALinear(torch.nn.Linear(256, 512).cuda().bfloat16(), 8, 16)
    paths = (True, False) if check_grouped_mm(layer) else (False,)

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 256, 16, generator=gen) * 0.1
    b = torch.randn(8, 16, 512, generator=gen) * 0.1
    x = torch.randn(300, 256, generator=gen)
    slots = np.random.default_rng(0).integers(-1, 8, size=300)
    want = lora_delta(x, a, b, LoRARows.of(slots, 8, "cpu", False))
    for grouped in paths:
        rows = LoRARows.of(slots, 8, "cuda", grouped)
        got = lora_delta(x.cuda().bfloat16(), a.cuda().bfloat16(), b.cuda().bfloat16(), rows)
        err = float((got.float().cpu() - want).norm() / want.norm())
        assert err < 2e-2, (grouped, err)
