"""Generation: continuous batching over the paged KV cache (scheduler, staged step inputs,
runner, sampler, output processing, CUDA graphs for decode-only steps)."""
