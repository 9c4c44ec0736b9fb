"""``packserve``: one command, three subcommands, the same model specs everywhere (a hub
id, a local directory, ``packaged:all-MiniLM-L6-v2``, ``smoke:decoder``).

| subcommand | what it runs                                                         |
|------------|----------------------------------------------------------------------|
| ``serve``  | the Serve application for one model from flags, or a Serve config (``deployments/app/serve_cli.py``) |
| ``batch``  | a resumable bulk job over a JSONL or Parquet file (``deployments/batch/cli.py``) |
| ``probe``  | the engine's token budget report for a model on this machine (``worker/budget/cli.py``) |

Exit status: 0 on success, 1 when the work could not finish, 2 for bad options, 130
when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from deployments.batch.cli import add_batch_parser
    from deployments.app.serve_cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="packserve", description="padding-free LLM inference "
                                     "on Ray Serve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_batch_parser(sub)
    probe = sub.add_parser("probe", help="print the token budget report for a model on this "
                           "machine (python -m worker.budget.cli)", add_help=False)
    probe.set_defaults(handler=_run_probe)
    return parser


def _run_probe(args: argparse.Namespace, rest: list[str]) -> int:
    """``python -m worker.budget.cli`` with its ``--model`` spec resolved to a directory first
    (``packaged:``/``smoke:`` specs are packserve's; the probe reads a checkpoint)."""
    from worker.budget.cli import main as probe_main
    from worker.models.sources import resolve_model

    rest = list(rest)
    for i, word in enumerate(rest):
        if word == "--model" and i + 1 < len(rest):
            rest[i + 1] = resolve_model(rest[i + 1])
        elif word.startswith("--model="):
            rest[i] = "--model=" + resolve_model(word.removeprefix("--model="))
    return probe_main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    from deployments.batch.config import JobConfigError, JobError
    from deployments.app.serve_cli import ServeOptionError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "probe":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args, rest) if args.command == "probe" else args.handler(args)
    except (JobConfigError, ServeOptionError) as exc:
        parser.error(str(exc))
    except JobError as exc:
        print(f"packserve {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "batch":
            print("packserve batch: interrupted; finished shards are kept, rerun the same "
                  "command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
