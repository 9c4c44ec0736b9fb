"""FP8 weights on a GPU (skipped without CUDA; never run yet: no GPU has been lent since
they were written): ``_scaled_mm`` passes its start-up check on sm89+ in bf16, an FP8
layer equals its fp32 definition within bf16 rounding, and generation with decode CUDA
graphs gives the tokens of eager steps."""

from __future__ import annotations

import pytest
import torch

from tests.factories import token_lists
from worker.generate.sampling import SamplingParams
from worker.quant.fp8 import DEQUANT, SCALED_MM, Fp8Linear, check_scaled_mm, quantize_weight

pytestmark = pytest.mark.gpu


def _sm89() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def test_scaled_mm_passes_its_check_on_an_fp8_gpu():
    problem = check_scaled_mm(torch.device("cuda"), torch.bfloat16)
    print(f"_scaled_mm on {torch.cuda.get_device_name()}: {problem or 'ok'}")
    if torch.cuda.get_device_capability() >= (9, 0):
        assert problem is None


@pytest.mark.parametrize("static", [False, True])
def test_the_layer_on_cuda_equals_its_fp32_definition(static):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 512, generator=gen), torch.randn(37, 512, generator=gen)
    q, scale = quantize_weight(w)
    s_in = torch.tensor(4.0 / 448) if static else None
    mode = SCALED_MM if check_scaled_mm(torch.device("cuda"), torch.bfloat16) is None else DEQUANT
    layer = Fp8Linear(q.cuda(), scale.cuda(), None, torch.bfloat16, mode=mode,
                      input_scale=None if s_in is None else s_in.cuda())
    got = layer(x.cuda().bfloat16()).float().cpu()
    want = Fp8Linear(q, scale, None, torch.float32, mode=DEQUANT, input_scale=s_in)(x)
    error = float((got - want).norm() / want.norm())
    assert error < 2e-2, (mode, error)


def test_fp8_generation_with_cuda_graphs_equals_eager(tiny_model, make_engine):
    base = tiny_model("llama")
    prompts = token_lists([9, 33, 17, 60], seed=2)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    kw = dict(device="cuda", dtype="bfloat16", quantization="fp8", max_num_batched_tokens=512)
    graphs = make_engine(base, **kw)
    eager = make_engine(base, cuda_graphs=False, **kw)
    layers = [m for m in graphs.runner.model.modules() if isinstance(m, Fp8Linear)]
    assert layers and (not _sm89() or {m.mode for m in layers} == {SCALED_MM})
    got = [o.token_ids for o in graphs.generate(prompts, params)]
    assert graphs.generation.runner.num_graph_steps > 0
    assert got == [o.token_ids for o in eager.generate(prompts, params)]
