"""The paged KV cache: the ref-counted block pool with the prefix cache in it, per-sequence
block tables, and the one tensor that holds every layer's K and V blocks."""
