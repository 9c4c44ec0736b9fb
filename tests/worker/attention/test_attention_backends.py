"""The reference varlen backend against a dense-mask ground truth (CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.worker._attention_cases import dense_truth, module, packed_qkv
from worker.attention import packed as attention

LENGTHS = [1, 7, 33, 16, 2, 50]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2, 1])
@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_dense_truth(causal, kv_heads, window):
    q, k, v, cu = packed_qkv(LENGTHS, kv_heads=kv_heads)
    scaling = 0.3  # not 1/sqrt(d): the backend must honour `scaling`
    out, weights = attention.reference_attention(
        module(causal), q, k, v, None, scaling=scaling, dropout=0.0, sliding_window=window,
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=50, max_length_k=50)
    assert weights is None and out.shape == (1, sum(LENGTHS), 8, 32)
    want = dense_truth(q, k, v, cu, causal, scaling, window)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_is_causal_kwarg_overrides_the_module():
    q, k, v, cu = packed_qkv([5, 9])
    out, _ = attention.reference_attention(module(True), q, k, v, None, scaling=0.2,
                                           is_causal=False, cu_seq_lens_q=cu)
    want = dense_truth(q, k, v, cu, False, 0.2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_a_dense_mask_is_refused():
    q, k, v, cu = packed_qkv([4])
    with pytest.raises(ValueError, match="dense attention_mask"):
        attention.reference_attention(module(True), q, k, v, torch.ones(1, 1, 4, 4),
                                      cu_seq_lens_q=cu)


def test_auto_selection_on_cpu():
    assert attention.select_backend("auto", "cpu", torch.float32) == "reference"
    assert attention.select_backend("auto", "cpu", torch.bfloat16) == "reference"
    assert attention.select_backend("auto", "cuda", torch.float32) == "reference"


def test_registration_names():
    from transformers import AttentionInterface

    name = attention.register("reference")
    assert name == "packserve_reference"
    registered = AttentionInterface._global_mapping[name]
    assert registered.func is attention._dispatch
    assert registered.args == (attention.reference_attention,)
