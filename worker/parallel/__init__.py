"""Tensor parallelism: the ranks of one replica and the sharded layers."""
