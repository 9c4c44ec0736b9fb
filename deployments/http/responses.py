"""OpenAI response bodies and stream chunks, built from engine outputs.

Logprobs of prompt tokens (``echo``) come from the engine's scoring pass, which returns
log p(token t | tokens < t) only: a prompt position's ``top_logprobs`` holds its own
token (the first position, which nothing precedes, is null, as OpenAI has it).
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np

from worker.params import TokenLogprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts the prompt
    tokens whose KV came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class CompletionLogprobs:
    """Builds one completion choice's ``logprobs`` (tokens, token_logprobs, top_logprobs,
    text_offset), prompt first when echoed. One per choice: ``text_offset`` counts from
    the start of that choice's text (``text_offset``: where its generated text starts)."""

    def __init__(self, tok, text_offset: int = 0):
        self.tok = tok
        self.offset = text_offset

    def prompt(self, token_ids: list[int], scores) -> dict:
        """First prompt token has no logprob (nothing precedes it); each later one its
        own log p, and its own token as its ``top_logprobs``."""
        values = [None] + [float(x) for x in scores]
        tops = [None] + [{self.tok.token_text(t): v} for t, v in zip(token_ids[1:], values[1:])]
        return self._entries(token_ids, values, tops)

    def generated(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict:
        tops = [top_logprobs(self.tok, t, e) for t, e in zip(token_ids, logprobs)]
        return self._entries(token_ids, [e.logprob for e in logprobs], tops)

    def _entries(self, token_ids, values, tops) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, value, top in zip(token_ids, values, tops):
            text = self.tok.token_text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(value)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def top_logprobs(tok, sampled: int, entry: TokenLogprobs) -> dict[str, float]:
    """A legacy completion position's ``top_logprobs``: OpenAI's dict keyed by token
    text, most likely first. The sampled token is always in it (as in vLLM, so k + 1
    entries when it is not among the top k), and tokens whose texts are equal keep the
    highest logprob (a later, less likely one never overwrites it)."""
    out: dict[str, float] = {}
    for token_id, value in (*entry.top, (sampled, entry.logprob)):
        text = tok.token_text(token_id)
        if text not in out or value > out[text]:
            out[text] = value
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def text_length(entries: dict | None) -> int:
    """Characters of the tokens of a ``logprobs`` object (where the next one starts)."""
    return sum(len(t) for t in entries["tokens"]) if entries else 0


def stop_string(tok, token_ids: list[int], text: str, stops, skip_special_tokens: bool
                ) -> str:
    """The stop string that ended ``text`` (the engine cuts the text before it): what
    ``include_stop_str_in_output`` puts back. "" when none did (EOS, a stop token, or
    max_tokens ended it). ``tok``: the model's ``ModelTokenizer``."""
    if not stops or not token_ids:
        return ""
    full = tok.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    if not full.startswith(text):
        return ""
    tail = full[len(text):]
    return next((s for s in stops if tail.startswith(s)), "")


def token_logprobs(entries: list | None) -> list[TokenLogprobs] | None:
    """A stream entry's wire logprobs (``[[logprob, [[id, logprob], ...]], ...]``) as
    ``TokenLogprobs`` (per token: only requests that asked for logprobs pay this)."""
    if entries is None:
        return None
    return [TokenLogprobs(lp, tuple((int(t), float(v)) for t, v in top)) for lp, top in entries]


def embeddings_body(vectors: np.ndarray, encoding_format: str, model: str,
                    num_tokens: int) -> bytes:
    """The /v1/embeddings response as JSON bytes, written row by row: no dict of
    Python floats for the whole list (FastAPI would walk it float by float)."""
    from deployments.http.tokens import embedding_json

    rows = ",".join(f'{{"object":"embedding","index":{i},"embedding":'
                    f"{embedding_json(v, encoding_format)}}}" for i, v in enumerate(vectors))
    tail = json.dumps({"model": model, "usage": {"prompt_tokens": num_tokens,
                                                 "total_tokens": num_tokens}})
    return f'{{"object":"list","data":[{rows}],{tail[1:]}'.encode()


def merge_logprobs(*parts: dict | None) -> dict | None:
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {key: [v for p in parts for v in p[key]] for key in parts[0]}


def chat_logprobs(tok, token_ids: list[int], logprobs: list[TokenLogprobs] | None) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, value: float) -> dict:
        text = tok.token_text(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**entry(t, e.logprob), "top_logprobs": [entry(tid, lp) for tid, lp in e.top]}
        for t, e in zip(token_ids, logprobs)]}


class Envelope:
    """The fields every body or chunk of one response shares."""

    def __init__(self, prefix: str, obj: str, model: str):
        self.id, self.object, self.model = new_id(prefix), obj, model
        self.created = int(time.time())

    def body(self, **fields) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, **fields}
