"""``packserve batch``: embed, score or generate over millions of documents on every GPU
of a Ray cluster, resumably.

| module        | noun                                                               |
|---------------|--------------------------------------------------------------------|
| ``config``    | ``JobConfig`` (frozen, validated), ``JobError``                    |
| ``inputs``    | JSONL and Parquet readers: scan for the plan, read one shard       |
| ``rows``      | ``BadRow`` and the per-row checks (ids, text)                      |
| ``shards``    | ``Shard``, ``ShardStats``, the ``Plan`` made once per job          |
| ``tokenize``  | the tokenizing Ray task -> ``TokenizedShard``                      |
| ``actor``     | ``BatchWorker``: one ``worker.Engine`` per GPU, runs whole shards  |
| ``outputs``   | output columns, JSONL/Parquet encoding, atomic writes, assembly    |
| ``parts``     | the parts directory: plan, per-shard parts, manifest (resume)      |
| ``progress``  | the progress bar and ``JobSummary``                                |
| ``job``       | ``run_job``: the driver                                            |
| ``cli``       | ``packserve batch ...`` (``main`` is the console script)           |
"""

from deployments.batch.config import JobConfig, JobConfigError, JobError

__all__ = ["JobConfig", "JobConfigError", "JobError", "run_job"]


def __getattr__(name: str):
    if name == "run_job":
        from deployments.batch.job import run_job

        return run_job
    raise AttributeError(f"module 'deployments.batch' has no attribute {name!r}")
