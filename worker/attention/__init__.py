"""Attention backends: packed varlen kernels registered into transformers (flash-attn,
torch varlen, the CPU reference) and the paged backends over the KV cache (torch, Triton)."""
