"""Fixtures for the model tests: the family matrix's checkpoints, built once per run."""

from __future__ import annotations

import json

import pytest

from tests.family_factories import make_family_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(name) -> Path`` for a family-matrix entry (tests/family_factories.py);
    decoders are saved without EOS so every request makes its full ``max_tokens``, in HF
    and in the engine alike."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = make_family_checkpoint(name, tmp_path_factory.mktemp(name))
            gen = path / "generation_config.json"
            if gen.exists():
                config = json.loads(gen.read_text())
                config.pop("eos_token_id", None)
                gen.write_text(json.dumps(config))
            cache[name] = path
        return cache[name]

    return get
