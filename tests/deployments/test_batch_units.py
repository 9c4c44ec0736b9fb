"""The batch job's parts without a Ray cluster: plans and shards, the parts directory
(commit, torn manifest lines), readers, settings, and the engine actor's class called
directly (per-row errors, a document that runs out of memory alone)."""

from __future__ import annotations

import json
import shutil

import pytest

from deployments.batch.actor import BatchWorker
from deployments.batch.cli import build_parser, config_from_args
from deployments.batch.config import JobConfig, JobConfigError, JobError
from deployments.batch.inputs import JsonlInput, ParquetInput, iter_rows
from deployments.batch.job import actor_layout, check_task
from deployments.batch.parts import PartsDir
from deployments.batch.rows import BadRow, ErrorKind, IdChecker
from deployments.batch.shards import ShardStats, make_plan, padded_tokens
from deployments.batch.tokenize import tokenize_shard
from tests.deployments.test_batch import make_docs, write_jsonl
from tests.worker._gen_helpers import add_word_tokenizer


def _config(tmp_path, **kw) -> JobConfig:
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        inp.write_text("")
    return JobConfig(**{"model": "m", "task": "embed", "input": str(inp),
                        "output": str(tmp_path / "out.jsonl"), **kw})


def test_shards_are_row_ranges_and_the_plan_is_deterministic(tmp_path):
    rows = make_docs(23) + ["", "{bad"] + [{"id": "doc-4", "text": "w3"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    source = JsonlInput(inp)
    plan = make_plan(source, 10, "id", {"k": 1})
    assert plan == make_plan(source, 10, "id", {"k": 1})
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 10), (10, 20), (20, 26)]
    lines = inp.read_bytes().splitlines(keepends=True)
    for shard in plan.shards:
        assert source.read(shard) == b"".join(lines[shard.start:shard.stop])
    assert {r: b.kind for r, b in plan.bad_rows.items()} == {
        23: ErrorKind.EMPTY_ROW, 24: ErrorKind.INVALID_JSON, 25: ErrorKind.DUPLICATE_ID}
    assert plan.bad_rows_by_shard() == {2: plan.bad_rows}
    plan.save(tmp_path / "plan.json")
    assert type(plan).load(tmp_path / "plan.json") == plan


def test_parquet_shards_cross_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(50)
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "in.parquet", row_group_size=7)
    source = ParquetInput(tmp_path / "in.parquet", "text", "id")
    plan = make_plan(source, 12, "id", {})
    got = [r for s in plan.shards for _, r in iter_rows(source.read(s), "parquet", s.start)]
    assert got == docs and not plan.bad_rows
    with pytest.raises(JobError, match="no column 'body' \\(--text-field\\)"):
        ParquetInput(tmp_path / "in.parquet", "body", "id")


def test_ids_are_one_type_and_the_first_row_wins():
    ids = IdChecker("id")
    assert ids.check(0, {"id": 5}) is None
    assert ids.check(1, {"id": "5"}).kind is ErrorKind.INVALID_ID
    assert ids.check(2, {"id": True}).kind is ErrorKind.INVALID_ID
    dup = ids.check(3, {"id": 5})
    assert (dup.kind, dup.id, dup.value) == (ErrorKind.DUPLICATE_ID, 5, 5)
    assert "row 0" in dup.reason
    assert IdChecker("").check(7, {}) is None  # keyed by row number


def test_a_torn_manifest_line_is_not_a_finished_shard(tmp_path):
    parts = PartsDir(tmp_path / "parts", "jsonl")
    parts.path.mkdir()
    stats = ShardStats(0, 3, 2, 1, 10, 12)
    parts.commit(stats, b'{"id": 1}\n{"id": 2}\n', b'{"row": 2}\n')
    with open(parts.manifest_path, "ab") as f:  # a kill while appending shard 1's line
        f.write(b'{"index": 1, "num_ro')
    parts.part(1).write_bytes(b"")
    parts.errors(1).write_bytes(b"")
    assert parts.finished() == {0: stats}
    assert parts.manifest_path.read_bytes().endswith(b"}\n")  # the torn tail is cut off
    parts.check_counts(parts.finished())
    parts.errors(0).write_bytes(b"")
    with pytest.raises(JobError, match="holds 0 records, the manifest says 1"):
        parts.check_counts(parts.finished())
    parts.part(0).unlink()  # committed files lost: the shard runs again
    assert parts.finished() == {}


def test_parts_of_other_settings_are_refused_or_discarded(tmp_path):
    parts = PartsDir(tmp_path / "parts", "jsonl")
    plan = make_plan(JsonlInput(write_jsonl(tmp_path / "in.jsonl", make_docs(5))), 2, "id",
                     {"shard_size": 2, "model": "m"})
    parts.save_plan(plan)
    assert parts.load_plan({"shard_size": 2, "model": "m"}, overwrite=False) == plan
    with pytest.raises(JobError, match="shard_size: 2 then, 3 now.*--overwrite"):
        parts.load_plan({"shard_size": 3, "model": "m"}, overwrite=False)
    assert parts.load_plan({"shard_size": 3, "model": "m"}, overwrite=True) is None
    assert not parts.path.exists()


def test_settings_name_the_option(tmp_path):
    with pytest.raises(JobConfigError, match="--output: must end in .jsonl"):
        _config(tmp_path, output=str(tmp_path / "out.csv"))
    with pytest.raises(JobConfigError, match="--pooling"):
        _config(tmp_path, task="score", pooling="mean")
    with pytest.raises(JobConfigError, match="--shard-size: must be an integer >= 1, got 0"):
        _config(tmp_path, shard_size=0)
    base = ["batch", "--model", "m", "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "o.jsonl")]
    parser = build_parser()
    with pytest.raises(JobConfigError, match="--temperature: SamplingParams.temperature"):
        config_from_args(parser.parse_args(base + ["--task", "generate", "--temperature", "-1"]))
    with pytest.raises(JobConfigError, match="--max-tokens: sampling options are for"):
        config_from_args(parser.parse_args(base + ["--task", "embed", "--max-tokens", "3"]))
    with pytest.raises(JobConfigError, match="--dtype"):
        config_from_args(parser.parse_args(base + ["--task", "embed", "--dtype", "int3"]))
    cfg = config_from_args(parser.parse_args(base + ["--task", "generate", "--stop", "x",
                                                     "--stop", "y", "--seed", "3"]))
    assert (cfg.sampling.stop, cfg.sampling.seed) == (("x", "y"), 3)


def test_one_actor_per_gpu_else_the_cpu_count_given(tmp_path):
    gpus = {"CPU": 16.0, "GPU": 8.0}
    assert actor_layout(_config(tmp_path), gpus) == (8, True)
    assert actor_layout(_config(tmp_path, device="cpu", num_actors=3), gpus) == (3, False)
    assert actor_layout(_config(tmp_path), {"CPU": 2.0}) == (1, False)
    with pytest.raises(JobError, match="need 2 GPUs; the cluster has 0"):
        actor_layout(_config(tmp_path, device="cuda", num_actors=2), {"CPU": 8.0})
    with pytest.raises(JobError, match="need 5 CPUs; the cluster has 4.*--num-actors"):
        actor_layout(_config(tmp_path, device="cpu", num_actors=4), {"CPU": 4.0})
    # tensor parallel: an actor takes tensor_parallel_size GPUs
    assert actor_layout(_config(tmp_path, tensor_parallel_size=2), gpus) == (4, True)
    with pytest.raises(JobError, match="3 engine actors of 4 ranks need 12 GPUs; the cluster"):
        actor_layout(_config(tmp_path, tensor_parallel_size=4, num_actors=3), gpus)


def test_a_task_the_model_cannot_do_is_refused(tmp_path):
    encoder = {"can_score": False, "is_decoder": False}
    with pytest.raises(JobError, match="language-modeling head"):
        check_task(_config(tmp_path, task="score"), encoder)
    with pytest.raises(JobError, match="needs a causal LM"):
        check_task(_config(tmp_path, task="generate"), encoder)
    check_task(_config(tmp_path, task="embed"), encoder)


def test_padded_tokens_in_file_order():
    assert padded_tokens([3, 1, 2, 5, 1], 2) == 3 * 2 + 5 * 2 + 1


@pytest.fixture(scope="module")
def llama_with_tokenizer(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("units-model") / "llama"
    shutil.copytree(tiny_model("llama"), path)
    return add_word_tokenizer(path)


def test_the_actor_loses_only_the_document_that_fails(llama_with_tokenizer, tmp_path,
                                                       monkeypatch):
    from worker.core.errors import RequestOutOfMemoryError

    docs = make_docs(12, seed=5) + [{"id": "long", "text": " ".join(["w4"] * 40)}]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    config = _config(tmp_path, model=str(llama_with_tokenizer), input=str(inp),
                     max_model_len=32, device="cpu")
    source = JsonlInput(inp)
    plan = make_plan(source, 100, "id", {})
    shard = plan.shards[0]
    tok = tokenize_shard(shard, source.read(shard), "jsonl", "text", "id", {}, config.model)
    worker = BatchWorker(config, plan.id_type, use_gpu=False)
    victim = tok.tokens(4).tolist()
    real_run = worker._run

    def run(token_lists):  # doc 4 runs out of memory whenever it is in the call
        if any(t.tolist() == victim for t in token_lists):
            raise RequestOutOfMemoryError(len(victim), 8192)
        return real_run(token_lists)

    monkeypatch.setattr(worker, "_run", run)
    result = worker.run(tok)
    rows = [json.loads(line) for line in result.part.splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for i, d in enumerate(docs[:12]) if i != 4]
    bad = [BadRow.from_json(json.loads(line)) for line in result.errors.splitlines()]
    assert [(b.row, b.kind, b.setting) for b in bad] == [
        (4, ErrorKind.OUT_OF_MEMORY, "max_model_len"), (12, ErrorKind.TOO_LONG, "max_model_len")]
    assert (result.stats.num_docs, result.stats.num_bad, result.stats.num_rows) == (11, 2, 13)
    worker.engine.shutdown()
