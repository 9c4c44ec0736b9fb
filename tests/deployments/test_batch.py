"""``packserve batch`` end to end on the run's local Ray cluster (CPU, tiny checkpoints):
outputs equal the engine's direct results, bad rows land in the errors file, a finished
job reruns as a no-op and refuses to mix settings.

The helpers here (documents, reading outputs, the reference engine) are shared with
test_batch_resume.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deployments.batch.cli import main
from deployments.batch.shards import padded_tokens
from tests.worker._gen_helpers import add_word_tokenizer

SHARD = 500


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama with a word-level tokenizer (word ``w<i>`` is token i)."""
    path = tmp_path_factory.mktemp("batch-model") / "llama"
    shutil.copytree(tiny_model("llama"), path)
    return add_word_tokenizer(path)


def make_docs(n: int, seed: int = 0, max_words: int = 24) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_words + 1, n)
    return [{"id": f"doc-{i}", "text": " ".join(f"w{t}" for t in rng.integers(3, 512, k))}
            for i, k in enumerate(lengths)]


def write_jsonl(path: Path, rows: list) -> Path:
    """``rows``: dicts (written as JSON) or strings (written as the line itself)."""
    with open(path, "w") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return path


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def token_ids(model_dir: Path, docs: list[dict]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer([d["text"] for d in docs])["input_ids"]


def reference_engine(model_dir: Path, **kwargs):
    from worker import Engine, EngineConfig

    return Engine(EngineConfig(model=str(model_dir), **kwargs))


def run_cli(model_dir: Path, task: str, inp: Path, out: Path, *extra: str,
            num_actors: int = 1) -> int:
    return main(["batch", "--model", str(model_dir), "--task", task, "--input", str(inp),
                 "--output", str(out), "--device", "cpu", "--num-actors", str(num_actors),
                 *extra])


def test_embed_10k_documents_equal_the_engine(ray_cluster, model_dir, tmp_path):
    docs = make_docs(10_000)
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, summary = tmp_path / "emb.jsonl", tmp_path / "summary.json"
    assert run_cli(model_dir, "embed", inp, out, "--shard-size", str(SHARD),
                   "--summary-json", str(summary), num_actors=2) == 0
    got = read_output(out)
    assert [r["id"] for r in got] == [d["id"] for d in docs]  # every id once, in input order
    ids = token_ids(model_dir, docs)
    with reference_engine(model_dir) as engine:
        want = engine.embed(ids)
    np.testing.assert_allclose(np.array([r["embedding"] for r in got], np.float32), want,
                               rtol=1e-4, atol=1e-5)
    assert [r["num_tokens"] for r in got] == [len(t) for t in ids]
    s = json.loads(summary.read_text())
    lengths = [len(t) for t in ids]
    padded = sum(padded_tokens(lengths[i:i + SHARD], 32) for i in range(0, len(ids), SHARD))
    assert (s["num_docs"], s["num_bad"], s["num_tokens"]) == (10_000, 0, sum(lengths))
    assert s["num_padded_tokens"] == padded and s["padding_avoided"] == padded - sum(lengths)
    assert (s["num_shards"], s["num_shards_resumed"], s["num_actors"]) == (20, 0, 2)
    assert (tmp_path / "emb.errors.jsonl").read_text() == ""


def test_score_and_generate_parquet_equal_the_engine(ray_cluster, model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [dict(d, id=i * 7) for i, d in enumerate(make_docs(300, seed=1))]  # integer ids
    inp = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(docs), inp, row_group_size=64)
    ids = token_ids(model_dir, docs)
    assert run_cli(model_dir, "score", inp, tmp_path / "score.parquet", "--shard-size", "100",
                   "--no-progress") == 0
    scored = read_output(tmp_path / "score.parquet")
    assert [r["id"] for r in scored] == [d["id"] for d in docs]
    with reference_engine(model_dir) as engine:
        want = engine.score(ids)
    for row, w in zip(scored, want):
        np.testing.assert_allclose(row["token_logprobs"], w, rtol=1e-4, atol=1e-4)
        assert row["logprob_sum"] == pytest.approx(float(w.sum()), rel=1e-4, abs=1e-3)

    gen_docs, gen_ids = docs[:120], ids[:120]
    pq.write_table(pa.Table.from_pylist(gen_docs), inp)
    assert run_cli(model_dir, "generate", inp, tmp_path / "gen.jsonl", "--shard-size", "50",
                   "--max-tokens", "4", "--temperature", "0", "--no-progress") == 0
    from worker.generate.sampling import SamplingParams

    with reference_engine(model_dir) as engine:
        want = engine.generate(gen_ids, SamplingParams(max_tokens=4, temperature=0))
    got = read_output(tmp_path / "gen.jsonl")
    assert [r["id"] for r in got] == [d["id"] for d in gen_docs]
    for row, w, prompt in zip(got, want, gen_ids):
        assert (row["token_ids"], row["text"], row["finish_reason"]) == (
            w.token_ids, w.text, w.finish_reason.value)
        assert (row["num_prompt_tokens"], row["num_generated_tokens"]) == (len(prompt),
                                                                           len(w.token_ids))


def test_bad_rows_land_in_the_errors_file(ray_cluster, model_dir, tmp_path):
    good = make_docs(60, seed=2)
    rows = good[:10] + [
        "{not json",  # row 10
        "",  # row 11: blank line
        "[1, 2]",  # row 12: not an object
        {"text": "w5 w6"},  # row 13: no id
        {"id": 1.5, "text": "w5"},  # row 14: an id that is neither str nor int
        {"id": "doc-3", "text": "w7 w8"},  # row 15: duplicate of row 3
        {"id": "no-text"},  # row 16
        {"id": "blank", "text": "   "},  # row 17
        {"id": "number", "text": 42},  # row 18
        {"id": "long", "text": " ".join(["w9"] * 40)},  # row 19: over --max-model-len 32
    ] + good[10:]
    inp = write_jsonl(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run_cli(model_dir, "embed", inp, out, "--shard-size", "16", "--max-model-len", "32",
                   "--errors", str(tmp_path / "bad.jsonl"), "--no-progress",
                   "--remove-parts") == 0
    assert not (tmp_path / "out.jsonl.parts").exists()
    assert [r["id"] for r in read_output(out)] == [d["id"] for d in good]
    errors = read_output(tmp_path / "bad.jsonl")
    assert [(e["row"], e["kind"]) for e in errors] == [
        (10, "invalid_json"), (11, "empty_row"), (12, "not_an_object"), (13, "missing_id"),
        (14, "invalid_id"), (15, "duplicate_id"), (16, "missing_text"), (17, "empty_text"),
        (18, "invalid_text"), (19, "too_long")]
    by_kind = {e["kind"]: e for e in errors}
    assert by_kind["duplicate_id"]["id"] == "doc-3" and "row 3" in by_kind["duplicate_id"]["reason"]
    long = by_kind["too_long"]
    assert (long["id"], long["limit"], long["value"], long["setting"]) == (
        "long", 32, 40, "max_model_len")
    assert "max_model_len=32" in long["reason"] and "40 tokens" in long["reason"]
    assert "Expecting" in by_kind["invalid_json"]["reason"]


def test_a_finished_job_reruns_as_a_no_op_and_refuses_other_settings(ray_cluster, model_dir,
                                                                     tmp_path, capsys):
    inp = write_jsonl(tmp_path / "docs.jsonl", make_docs(50, seed=3))
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    args = ("--shard-size", "20", "--no-progress", "--summary-json", str(summary))
    assert run_cli(model_dir, "embed", inp, out, *args) == 0
    first = out.read_bytes()
    out.unlink()
    assert run_cli(model_dir, "embed", inp, out, *args) == 0
    assert out.read_bytes() == first  # reassembled from the parts; nothing ran again
    s = json.loads(summary.read_text())
    assert (s["num_shards"], s["num_shards_resumed"], s["run_docs"]) == (3, 3, 0)
    assert run_cli(model_dir, "embed", inp, out, "--shard-size", "10", "--no-progress") == 1
    assert "shard_size: 20 then, 10 now" in capsys.readouterr().err
    assert out.read_bytes() == first


def test_a_model_without_a_tokenizer_is_refused(ray_cluster, tiny_model, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "docs.jsonl", make_docs(5))
    assert run_cli(tiny_model("llama"), "embed", inp, tmp_path / "out.jsonl",
                   "--no-progress") == 1
    assert "no tokenizer could be loaded" in capsys.readouterr().err


def test_generate_and_embed_on_an_engine_of_two_ranks(ray_cluster, model_dir, tmp_path):
    """``packserve batch -tp 2``: the engine actor spawns its second rank; generated tokens
    and embeddings equal one rank's."""
    docs = make_docs(40, seed=5)
    inp = tmp_path / "docs.jsonl"
    write_jsonl(inp, docs)
    ids = token_ids(model_dir, docs)
    assert run_cli(model_dir, "generate", inp, tmp_path / "gen.jsonl", "-tp", "2",
                   "--max-tokens", "4", "--temperature", "0", "--no-progress") == 0
    assert run_cli(model_dir, "embed", inp, tmp_path / "emb.jsonl", "-tp", "2",
                   "--no-progress") == 0
    from worker.generate.sampling import SamplingParams

    with reference_engine(model_dir) as engine:
        want = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0))
        vectors = engine.embed(ids)
    got = read_output(tmp_path / "gen.jsonl")
    assert [r["token_ids"] for r in got] == [w.token_ids for w in want]
    embedded = read_output(tmp_path / "emb.jsonl")
    np.testing.assert_allclose([r["embedding"] for r in embedded], vectors, rtol=1e-4, atol=1e-4)


def test_generate_with_a_lora_adapter(ray_cluster, model_dir, tmp_path, capsys):
    """``packserve batch --lora NAME=PATH``: every row's tokens equal the engine's with
    that adapter (and differ from the base model's); the adapter is in the fingerprint."""
    from tests.lora_factories import make_adapter
    from worker.generate.sampling import SamplingParams

    adapter = make_adapter(model_dir, tmp_path / "adapter", r=8, seed=4)
    docs = make_docs(30, seed=6)
    inp = tmp_path / "docs.jsonl"
    write_jsonl(inp, docs)
    ids = token_ids(model_dir, docs)
    out = tmp_path / "gen.jsonl"
    assert run_cli(model_dir, "generate", inp, out, "--lora", f"sql={adapter}",
                   "--max-tokens", "4", "--temperature", "0", "--no-progress") == 0
    params = SamplingParams(max_tokens=4, temperature=0)
    with reference_engine(model_dir, lora_modules=(("sql", str(adapter)),)) as engine:
        want = engine.generate(ids, params, lora="sql")
        base = engine.generate(ids, params)
    got = [r["token_ids"] for r in read_output(out)]
    assert got == [w.token_ids for w in want] and got != [b.token_ids for b in base]
    assert run_cli(model_dir, "generate", inp, out, "--max-tokens", "4", "--temperature", "0",
                   "--no-progress") == 1  # the parts were written with the adapter
    assert "lora: ['sql'" in capsys.readouterr().err
