"""The engine actor: one ``worker.Engine`` per GPU (or per CPU slot) that runs whole
tokenized shards and returns them encoded, ready to commit.

Each shard goes to the engine in one call, so the engine packs the whole shard into its
own FFD bins. Rows are checked one by one first, with the engine's own checks (the
typed ``InvalidRequestError`` subclasses, naming limit, value and setting), because the
engine's batch calls refuse a whole batch for its first bad row. ``job.py`` makes the
class a Ray actor (``ray.remote(BatchWorker)``); this module imports no Ray.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from deployments.batch.config import JobConfig, JobError
from deployments.batch.outputs import encode_errors, encode_part
from deployments.batch.rows import BadRow
from deployments.batch.shards import ShardStats, padded_tokens
from deployments.batch.tokenize import TokenizedShard
from worker.core.errors import InvalidRequestError, RequestOutOfMemoryError
from worker.core.request import Task, validate

logger = logging.getLogger(__name__)

ROW_ERRORS = (InvalidRequestError, RequestOutOfMemoryError)  # one document's fault, not the job's


@dataclass
class ShardResult:
    stats: ShardStats
    part: bytes  # the shard's outputs, in the output format, in row order
    errors: bytes  # the shard's bad rows, JSONL, in row order


class BatchWorker:
    """Owns one engine. ``use_gpu``: the actor was given a GPU by Ray."""

    def __init__(self, config: JobConfig, id_type: str | None, use_gpu: bool):
        import torch
        from transformers.utils import logging as hf_logging

        from worker import Engine

        hf_logging.disable_progress_bar()

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if config.device == "cuda" and device == "cpu":
            raise JobError("--device cuda, but this actor sees no CUDA device; use --device "
                           "auto or cpu")
        if device == "cpu":  # Ray's OMP_NUM_THREADS follows num_cpus; say it for torch too
            torch.set_num_threads(max(1, int(config.num_cpus_per_actor)))
        self.config, self.id_type = config, id_type
        self.engine = Engine(config.engine_config(device))
        self.params = None
        self._lora = config.lora[0] if config.lora else None
        if config.task == "generate":
            from worker.params import SamplingParams

            self.params = config.sampling or SamplingParams()

    def info(self) -> dict:
        """What the driver checks before sending shards."""
        cfg, spec = self.engine.config, self.engine.spec
        return {"device": cfg.device, "max_model_len": cfg.max_model_len,
                "max_num_batched_tokens": cfg.max_num_batched_tokens,
                "is_decoder": spec.is_decoder, "can_score": self.engine.limits.can_score,
                "can_classify": self.engine.limits.can_classify,
                "hidden_size": spec.hidden_size, "attention_backend": cfg.attention_backend}

    def run(self, tok: TokenizedShard) -> ShardResult:
        """The shard's outputs and bad rows, encoded, with its stats. Raises only for the
        engine's own failure (``EngineDeadError``): that fails the shard, not a row."""
        started, cpu_started = time.perf_counter(), time.process_time()
        bad = list(tok.bad)
        docs = []
        for i in range(tok.num_docs):  # per document of the shard
            try:
                self._check(tok.tokens(i))
                docs.append(i)
            except ROW_ERRORS as exc:
                bad.append(BadRow.from_error(int(tok.rows[i]), tok.ids[i], exc))
        outputs = self._compute(tok, docs, bad)
        kept = [i for i in docs if i in outputs]
        lengths = tok.cu_tokens[1:] - tok.cu_tokens[:-1]
        columns = self._columns(tok, kept, outputs, lengths)
        bad.sort(key=lambda b: b.row)
        cfg = self.config
        part = encode_part(columns, cfg.output_format, cfg.task, self.id_type)
        errors = encode_errors(bad)
        kept_lengths = [int(lengths[i]) for i in kept]
        stats = ShardStats(tok.shard.index, tok.shard.num_rows, len(kept), len(bad),
                           sum(kept_lengths), padded_tokens(kept_lengths, cfg.padded_batch_size),
                           sum(columns.get("num_generated_tokens", ())),
                           time.perf_counter() - started,
                           tok.cpu_s + time.process_time() - cpu_started)
        return ShardResult(stats, part, errors)

    # ---- helpers --------------------------------------------------------------------

    def _check(self, token_ids: np.ndarray) -> None:
        if self.params is not None:
            self.engine.generation.make_sequence(token_ids, self.params, self._lora)
            return
        validate(token_ids, Task(self.config.task), self.engine.limits)

    def _run(self, token_lists: list) -> list:
        cfg, engine = self.config, self.engine
        if cfg.task == "embed":
            return list(engine.embed(token_lists, pooling=cfg.pooling, normalize=cfg.normalize))
        if cfg.task == "score":
            return engine.score(token_lists)
        if cfg.task == "classify":
            return list(engine.classify(token_lists))
        return engine.generate(token_lists, self.params, lora=self._lora)

    def _compute(self, tok: TokenizedShard, docs: list[int], bad: list[BadRow]) -> dict:
        """Outputs by document index. All in one packed call; should a document fail on
        its own (out of memory alone), again one by one so only it is lost."""
        try:
            return dict(zip(docs, self._run([tok.tokens(i) for i in docs])))
        except ROW_ERRORS as exc:
            logger.warning("shard %d: %r; running its documents one by one",
                           tok.shard.index, exc)
        outputs = {}
        for i in docs:  # per document, only after a failed shard call
            try:
                outputs[i] = self._run([tok.tokens(i)])[0]
            except ROW_ERRORS as exc:
                bad.append(BadRow.from_error(int(tok.rows[i]), tok.ids[i], exc))
        return outputs

    def _columns(self, tok: TokenizedShard, kept: list[int], outputs: dict,
                 lengths: np.ndarray) -> dict[str, list]:
        columns: dict[str, list] = {"id": [tok.ids[i] for i in kept]}
        task = self.config.task
        if task == "embed":
            columns["embedding"] = [outputs[i] for i in kept]
        elif task == "score":
            columns["token_logprobs"] = [outputs[i] for i in kept]
            columns["logprob_sum"] = [float(outputs[i].sum(dtype=np.float64)) for i in kept]
        elif task == "classify":
            labels = self.engine.labels
            probs = labels.probabilities(np.stack([outputs[i] for i in kept])) if kept else []
            columns["label"] = labels.top_labels(probs) if kept else []
            columns["probs"] = list(probs)
        if task != "generate":
            columns["num_tokens"] = [int(lengths[i]) for i in kept]
            return columns
        gen = [outputs[i] for i in kept]
        columns["text"] = [g.text for g in gen]
        columns["token_ids"] = [list(g.token_ids) for g in gen]
        columns["finish_reason"] = [g.finish_reason.value for g in gen]
        columns["num_prompt_tokens"] = [int(lengths[i]) for i in kept]
        columns["num_generated_tokens"] = [len(g.token_ids) for g in gen]
        return columns
