"""``packserve batch --task classify``: 5,000 rows equal the engine called directly
(label and probabilities per row, JSONL and Parquet), a model without a head is refused
before any shard runs, and a job whose driver is SIGKILLed resumes to the same output.
A tiny random BERT classifier with the word-level tokenizer of the batch tests."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.classify_factories import LABELS, make_tiny_classifier
from tests.deployments.test_batch import (
    make_docs,
    read_output,
    reference_engine,
    run_cli,
    token_ids,
    write_jsonl,
)
from tests.deployments.test_batch_resume import kill_then_rerun
from tests.worker._gen_helpers import add_word_tokenizer


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    path = make_tiny_classifier("bert", tmp_path_factory.mktemp("batch-cls") / "bert")
    return add_word_tokenizer(path)


def expected(model: Path, docs: list[dict]) -> tuple[list[str], np.ndarray]:
    with reference_engine(model) as engine:
        probs = engine.labels.probabilities(engine.classify(token_ids(model, docs)))
        return engine.labels.top_labels(probs), probs


def check_rows(rows: list[dict], docs: list[dict], labels: list[str], probs: np.ndarray):
    assert [r["id"] for r in rows] == [d["id"] for d in docs]  # every id once, in order
    assert [r["label"] for r in rows] == labels
    np.testing.assert_allclose(np.array([r["probs"] for r in rows], np.float32), probs,
                               atol=1e-5)


def test_classify_5000_rows_equal_the_engine(ray_cluster, classifier_dir, tmp_path):
    docs = make_docs(5000, seed=11, max_words=60)
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, summary = tmp_path / "cls.jsonl", tmp_path / "summary.json"
    assert run_cli(classifier_dir, "classify", inp, out, "--shard-size", "1000",
                   "--no-progress", "--summary-json", str(summary)) == 0
    rows = read_output(out)
    labels, probs = expected(classifier_dir, docs)
    check_rows(rows, docs, labels, probs)
    assert set(labels) <= set(LABELS[3]) and len(set(labels)) > 1
    lengths = [len(t) for t in token_ids(classifier_dir, docs)]
    assert [r["num_tokens"] for r in rows] == lengths
    s = json.loads(summary.read_text())
    assert (s["num_docs"], s["num_bad"], s["num_tokens"]) == (5000, 0, sum(lengths))
    assert (tmp_path / "cls.errors.jsonl").read_text() == ""

    few = write_jsonl(tmp_path / "few.jsonl", docs[:600])  # as Parquet (probs: list<float>)
    parquet = tmp_path / "cls.parquet"
    assert run_cli(classifier_dir, "classify", few, parquet, "--shard-size", "300",
                   "--no-progress") == 0
    check_rows(read_output(parquet), docs[:600], labels[:600], probs[:600])


def test_classify_needs_a_classification_head(ray_cluster, tiny_model, tmp_path, capsys):
    model = add_word_tokenizer(Path(shutil.copytree(tiny_model("bert"), tmp_path / "bert")))
    inp = write_jsonl(tmp_path / "docs.jsonl", make_docs(5))
    assert run_cli(model, "classify", inp, tmp_path / "out.jsonl", "--no-progress") == 1
    assert "--task classify needs a sequence-classification checkpoint" in capsys.readouterr().err


def test_sigkill_the_driver_then_rerun(classifier_dir, tmp_path):
    num_docs, shard = 2000, 50
    docs = make_docs(num_docs, seed=13)
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, summary = tmp_path / "cls.jsonl", tmp_path / "summary.json"
    command = [sys.executable, "-m", "deployments.batch", "--model", str(classifier_dir),
               "--task", "classify", "--input", str(inp), "--output", str(out),
               "--shard-size", str(shard), "--device", "cpu", "--num-actors", "1",
               "--no-progress", "--summary-json", str(summary)]
    kill_then_rerun(command, out, summary, num_docs // shard)
    check_rows(read_output(out), docs, *expected(classifier_dir, docs))
