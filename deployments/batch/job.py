"""A batch job, end to end: plan, start the engine actors, stream shards through
tokenizing tasks into the actors, commit each finished shard, assemble the output.

Shards flow as: the driver reads a shard's raw rows -> a Ray task tokenizes them (any
CPU of the cluster) -> an engine actor (one per GPU) packs and runs them and encodes the
results -> the driver commits the encoded part (``parts.PartsDir.commit``). Each actor
has ``SHARDS_PER_ACTOR`` shards queued, so the next one is tokenized and shipped while
the current one runs; a free actor takes the next shard (no static assignment). See
docs/decisions.md, "Bulk jobs", for why plain actors and not Ray Data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path

from deployments.batch.actor import BatchWorker
from deployments.batch.config import JobConfig, JobError
from deployments.batch.inputs import open_input
from deployments.batch.outputs import assemble
from deployments.batch.parts import PartsDir
from deployments.batch.progress import JobSummary, Progress
from deployments.batch.shards import Plan, ShardStats, make_plan
from deployments.batch.tokenize import tokenize_shard, warm_up

logger = logging.getLogger(__name__)

SHARDS_PER_ACTOR = 2  # queued per actor: one running, the next being tokenized and shipped
TOKENIZE_CPUS = 1  # per tokenizing task; the cluster needs one CPU beyond the actors'


def run_job(config: JobConfig) -> JobSummary:
    """Run (or resume) the job; raises ``JobError`` when it cannot finish. Uses the Ray
    connection of this process when there is one, else joins ``config.address``, else
    starts a local cluster (and shuts down only what it started)."""
    started = time.perf_counter()
    parts = PartsDir(config.parts_path, config.output_format)
    source = open_input(config.input, config.input_format, config.text_field, config.id_field)
    plan = _plan(config, parts, source)
    done = parts.finished()
    todo = [s for s in plan.shards if s.index not in done]
    logger.info("%d rows in %d shards of %d; %d finished by an earlier run", plan.num_rows,
                len(plan.shards), config.shard_size, len(plan.shards) - len(todo))
    run: list[ShardStats] = []
    processing_s, startup_s, actors, info = 0.0, 0.0, [], {}
    if todo:
        ray_started = time.perf_counter()
        with _ray_connection(config):
            actors, info = _start_actors(config, plan)
            startup_s = time.perf_counter() - ray_started
            progress = Progress(plan.num_rows, plan.num_rows - sum(s.num_rows for s in todo),
                                config.progress)
            try:
                run = _run_shards(config, plan, source, parts, todo, actors, progress)
            finally:
                processing_s = progress.close()
    done = parts.finished()
    _assemble(config, plan, parts, done)
    return JobSummary.build(list(done.values()), run, output=config.output,
                            errors=str(config.errors_path), processing_s=processing_s,
                            wall_s=time.perf_counter() - started, startup_s=startup_s,
                            padded_batch_size=config.padded_batch_size,
                            num_actors=len(actors), device=info.get("device"))


def _plan(config: JobConfig, parts: PartsDir, source) -> Plan:
    fingerprint = config.fingerprint()
    plan = parts.load_plan(fingerprint, config.overwrite)
    if plan is None:
        scan_started = time.perf_counter()
        plan = make_plan(source, config.shard_size, config.id_field, fingerprint)
        parts.save_plan(plan)
        logger.info("planned %d rows in %.1f s: %d bad before tokenizing", plan.num_rows,
                    time.perf_counter() - scan_started, len(plan.bad_rows))
    return plan


@contextlib.contextmanager
def _ray_connection(config: JobConfig):
    import ray

    if ray.is_initialized():
        yield
        return
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
    else:  # never a bare ray.init(): it would join whatever cluster it finds
        actors = config.num_actors or 1
        cpus = max(os.cpu_count() or 1, int(actors * config.num_cpus_per_actor + 0.999)
                   + TOKENIZE_CPUS)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def actor_layout(config: JobConfig, resources: dict) -> tuple[int, bool]:
    """``(number of engine actors, whether each takes a GPU)`` for a cluster with
    ``resources`` (``ray.cluster_resources()``): one per GPU (per ``tensor_parallel_size``
    GPUs), unless told otherwise."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    tp = config.tensor_parallel_size
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    num_actors = config.num_actors or (max(1, gpus // tp) if use_gpu else 1)
    if use_gpu and num_actors * tp > gpus:
        raise JobError(f"{num_actors} engine actors of {tp} ranks need {num_actors * tp} GPUs;"
                       f" the cluster has {gpus} (lower --num-actors or --tensor-parallel-size,"
                       " or --device cpu)")
    need = num_actors * config.num_cpus_per_actor + TOKENIZE_CPUS
    if cpus < need:
        raise JobError(f"{num_actors} engine actors of --num-cpus-per-actor "
                       f"{config.num_cpus_per_actor:g} plus one tokenizing task need {need:g} "
                       f"CPUs; the cluster has {cpus:g} (lower --num-actors or "
                       "--num-cpus-per-actor)")
    return num_actors, use_gpu


def check_task(config: JobConfig, info: dict) -> None:
    """Refuse a task the model cannot do before any shard runs (``info``: the actor's)."""
    if config.task == "score" and not info["can_score"]:
        raise JobError(f"--task score needs a model with a language-modeling head; "
                       f"{config.model} is an encoder (use --task embed)")
    if config.task == "generate" and not info["is_decoder"]:
        raise JobError(f"--task generate needs a causal LM; {config.model} is an encoder")
    if config.task == "classify" and not info["can_classify"]:
        raise JobError(f"--task classify needs a sequence-classification checkpoint (an "
                       f"*ForSequenceClassification architecture); {config.model} has no "
                       "classification head")


def _start_actors(config: JobConfig, plan: Plan) -> tuple[list, dict]:
    """The engine actors, loaded and checked for the task; and the first one's info."""
    import ray

    num_actors, use_gpu = actor_layout(config, ray.cluster_resources())
    cls = ray.remote(BatchWorker).options(num_cpus=config.num_cpus_per_actor,
                                          num_gpus=config.tensor_parallel_size if use_gpu
                                          else 0,
                                          max_restarts=1, max_task_retries=1)
    actors = [cls.remote(config, plan.id_type, use_gpu) for _ in range(num_actors)]
    warm = ray.remote(warm_up).options(num_cpus=TOKENIZE_CPUS)
    warming = [warm.remote(config.model, config.trust_remote_code) for _ in actors]
    try:  # tokenizing workers start and load the tokenizer while the engines load
        ray.get(warming)
    except ray.exceptions.RayTaskError as exc:
        raise JobError(f"--model {config.model}: no tokenizer could be loaded "
                       f"({exc.cause!r})") from exc
    try:
        info = ray.get([a.info.remote() for a in actors])[0]
    except ray.exceptions.RayError as exc:
        raise JobError(f"the engine actors failed to start: {exc}") from exc
    check_task(config, info)
    logger.info("%d engine actors on %s: max_model_len %d, token budget %d, attention %s",
                num_actors, info["device"], info["max_model_len"],
                info["max_num_batched_tokens"], info["attention_backend"])
    return actors, info


def _run_shards(config: JobConfig, plan: Plan, source, parts: PartsDir, todo: list,
                actors: list, progress: Progress) -> list[ShardStats]:
    """Every shard in ``todo`` through an actor; committed as each finishes. A shard that
    fails (not a row: the actor died twice, say) stops new sends; the in-flight ones
    still commit, then ``JobError`` says which failed (a rerun resumes)."""
    import ray

    tokenize = ray.remote(tokenize_shard).options(num_cpus=TOKENIZE_CPUS)
    planned_bad = plan.bad_rows_by_shard()
    pending, in_flight = deque(todo), {}

    def send(actor) -> None:
        shard = pending.popleft()
        tokenized = tokenize.remote(shard, source.read(shard), source.format, config.text_field,
                                    config.id_field, planned_bad.get(shard.index, {}),
                                    config.model, config.trust_remote_code)
        in_flight[actor.run.remote(tokenized)] = (actor, shard)

    for _ in range(SHARDS_PER_ACTOR):
        for actor in actors:
            if pending:
                send(actor)
    finished, failed = [], []
    while in_flight:  # per finished shard
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        actor, shard = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            logger.error("shard %d failed: %s", shard.index, exc)
            failed.append((shard.index, exc))
            pending.clear()
            continue
        parts.commit(result.stats, result.part, result.errors)
        finished.append(result.stats)
        progress.update(result.stats)
        if pending:
            send(actor)
    if failed:
        index, exc = failed[0]
        raise JobError(f"{len(failed)} shards failed (first: shard {index}: {exc}); "
                       f"{len(finished)} finished this run are kept: rerun the same command "
                       "to resume") from exc
    return finished


def _assemble(config: JobConfig, plan: Plan, parts: PartsDir, done: dict) -> None:
    missing = [s.index for s in plan.shards if s.index not in done]
    if missing:
        raise JobError(f"{len(missing)} shards are not finished (first: {missing[0]}); rerun "
                       "the same command to resume")
    parts.check_counts(done)
    order = [s.index for s in plan.shards]
    assemble([parts.part(i) for i in order], Path(config.output), config.output_format,
             config.task, plan.id_type)
    assemble([parts.errors(i) for i in order], config.errors_path, "jsonl")
    if config.remove_parts:
        parts.clear()
