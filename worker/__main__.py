"""``python -m worker embed|score|classify --model PATH``: the engine alone, without Ray.

Reads one sequence per stdin line: whitespace-separated token ids, or text with
``--text`` (tokenized with the model's tokenizer). Writes one JSON array per line
(classify: one ``{"label", "probs"}`` object per line).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from worker.core.config import EngineConfig
from worker.models.sources import resolve_model


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["embed", "score", "classify"])
    p.add_argument("--model", required=True, help="hub id, local checkpoint directory, "
                   "packaged:all-MiniLM-L6-v2 or smoke:decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--pooling", choices=["mean", "last", "cls"], default=None)
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--text", action="store_true", help="stdin lines are text, not token ids")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-untested-model", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype,
        attention_backend=args.attention_backend,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        trust_remote_code=args.trust_remote_code, allow_untested_model=args.allow_untested_model,
    )
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.text:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model),
                                                  trust_remote_code=args.trust_remote_code)
        sequences = [tokenizer(line)["input_ids"] for line in lines]
    else:
        sequences = [[int(tok) for tok in line.split()] for line in lines]
    from worker.engine.engine import Engine

    with Engine(config) as engine:
        if args.task == "classify":
            probs = engine.labels.probabilities(engine.classify(sequences))
            for label, row in zip(engine.labels.top_labels(probs), probs):
                print(json.dumps({"label": label, "probs": [round(float(x), 6) for x in row]}))
            return 0
        if args.task == "embed":
            outputs = engine.embed(sequences, pooling=args.pooling, normalize=args.normalize)
        else:
            outputs = engine.score(sequences)
    for out in outputs:
        print(json.dumps([round(float(x), 6) for x in out]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
