"""``packserve batch``: the bulk job's options (see ``deployments.batch``); the
``packserve`` command itself is ``deployments/app/cli.py``.

Exit status: 0 when the output is complete (bad rows do not count as failure), 1 when
the job could not finish (finished shards are kept: rerun to resume), 2 for bad options,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from deployments.batch.config import TASKS, JobConfig, JobConfigError


def build_parser() -> argparse.ArgumentParser:
    """The whole ``packserve`` parser (``deployments/app/cli.py``)."""
    from deployments.app.cli import build_parser as packserve_parser

    return packserve_parser()


def add_batch_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("batch", help="embed, score, generate or classify over a JSONL or "
                       "Parquet file on every GPU of a Ray cluster (resumable)",
                       description="Embed, score, generate or classify every row of --input, on "
                       "one engine per GPU of the Ray cluster; resumable: rerun the same "
                       "command after a crash and finished shards are skipped.")
    p.set_defaults(handler=_run_batch)
    p.add_argument("--model", required=True, help="hub id, local checkpoint directory, "
                   "packaged:NAME or smoke:decoder")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--input", required=True, help=".jsonl/.ndjson or .parquet")
    p.add_argument("--output", required=True, help=".jsonl/.ndjson or .parquet")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id", help="'' keys the output by row number")
    p.add_argument("--errors", help="bad rows, JSONL (default: <output stem>.errors.jsonl)")
    p.add_argument("--parts-dir", help="resume state and per-shard parts "
                   "(default: <output>.parts)")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    p.add_argument("--padded-batch-size", type=int, default=32,
                   help="the padded baseline of the summary's 'padding avoided'")
    p.add_argument("--overwrite", action="store_true",
                   help="discard parts left by a run with other settings")
    p.add_argument("--remove-parts", action="store_true",
                   help="delete the parts directory once the output is assembled")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--summary-json", help="also write the summary here")
    e = p.add_argument_group("engine")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--dtype", default="auto")
    e.add_argument("--attention-backend", default="auto")
    e.add_argument("--max-num-batched-tokens", type=int)
    e.add_argument("--max-model-len", type=int)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks per engine actor (one GPU each; the actor spawns them)")
    e.add_argument("--allow-untested-model", action="store_true",
                   help="run a family the family matrix has not proven (docs/models.md)")
    c = p.add_argument_group("cluster")
    c.add_argument("--address", help="join this Ray cluster (default: start a local one)")
    c.add_argument("--num-actors", type=int,
                   help="engine actors (default: one per GPU; 1 without GPUs)")
    c.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    m = p.add_argument_group("embed")
    m.add_argument("--pooling", choices=("mean", "last", "cls"))
    m.add_argument("--normalize", action="store_true")
    g = p.add_argument_group("generate (worker.generate.sampling.SamplingParams)")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int, help="the same seed for every document: each one's "
                   "output is then reproducible, whatever shard or actor runs it")
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--lora", metavar="NAME=PATH", help="generate every row with this LoRA "
                   "adapter (a PEFT directory) on --model")
    return p


SAMPLING_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """A validated ``JobConfig``; raises ``JobConfigError`` naming the option."""
    given = {name: getattr(args, name) for name in SAMPLING_OPTIONS
             if getattr(args, name) is not None}
    if args.ignore_eos:
        given["ignore_eos"] = True
    sampling = None
    if args.task == "generate":
        from worker.params import SamplingParams

        try:
            sampling = SamplingParams(**given)
        except ValueError as exc:  # InvalidSamplingParamsError names the field
            field = getattr(exc, "field", "max_tokens")
            raise JobConfigError(field.replace("_", "-"), str(exc)) from None
    elif given:
        raise JobConfigError(next(iter(given)).replace("_", "-"),
                             f"sampling options are for --task generate, not {args.task}")
    try:
        return JobConfig(
            model=args.model, task=args.task, input=args.input, output=args.output,
            text_field=args.text_field, id_field=args.id_field, errors=args.errors,
            parts_dir=args.parts_dir, shard_size=args.shard_size,
            padded_batch_size=args.padded_batch_size, overwrite=args.overwrite,
            remove_parts=args.remove_parts, device=args.device, dtype=args.dtype,
            attention_backend=args.attention_backend,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, trust_remote_code=args.trust_remote_code,
            allow_untested_model=args.allow_untested_model,
            tensor_parallel_size=args.tensor_parallel_size, address=args.address,
            num_actors=args.num_actors, num_cpus_per_actor=args.num_cpus_per_actor,
            pooling=args.pooling,
            normalize=args.normalize, sampling=sampling, lora=_lora(args.lora),
            progress=args.progress)
    except ValueError as exc:  # worker.core.config.ConfigError names the EngineConfig field
        if isinstance(exc, JobConfigError):
            raise
        field = getattr(exc, "field", "model").replace("_", "-")
        raise JobConfigError(field, str(exc)) from None


def _lora(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise JobConfigError("lora", f"takes NAME=PATH, got {text!r}")
    return name, path


def _run_batch(args: argparse.Namespace) -> int:
    from deployments.batch.job import run_job

    config = config_from_args(args)
    summary = run_job(config)
    for line in summary.lines():
        print(line, file=sys.stderr)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary.to_json(), f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``packserve`` (deployments/app/cli.py), kept here for ``python -m deployments.batch``."""
    from deployments.app.cli import main as packserve_main

    return packserve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
