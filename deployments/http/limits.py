"""The ingress's limits on one request, each checked before the work it protects, each
refusal a 400 naming the field, the limit, the value and the setting to change.

| check                   | limit                                  | before          |
|-------------------------|----------------------------------------|-----------------|
| ``check_chars``         | ``http.max_prompt_chars`` characters   | tokenizing      |
| ``check_embedding_inputs`` | ``http.max_embedding_inputs`` items | tokenizing      |
| ``check_vocab``         | the model's vocabulary                 | admission       |
| ``check_logit_bias``    | the model's vocabulary                 | admission       |
| ``check_length``        | ``max_model_len`` (prompt + max_tokens)| admission       |
| ``chat_max_tokens``     | the context left, when not sent        | admission       |
"""

from __future__ import annotations

from deployments.http.errors import bad_request
from deployments.replica.work import ModelInfo

OPENAI_MAX_EMBEDDING_INPUTS = 2048


def check_chars(num_chars: int, limit: int, field: str) -> None:
    if num_chars > limit:
        raise bad_request(f"{field} has {num_chars} characters, more than the limit of "
                          f"{limit} per request (http.max_prompt_chars); shorten it",
                          param=field)


def check_embedding_inputs(num_inputs: int, limit: int) -> None:
    if num_inputs == 0:
        raise bad_request("input is empty: send a string, a list of strings, or token id "
                          "arrays", param="input")
    if num_inputs > limit:
        raise bad_request(f"input has {num_inputs} items, more than the limit of {limit} per "
                          f"request (http.max_embedding_inputs; OpenAI's is "
                          f"{OPENAI_MAX_EMBEDDING_INPUTS}); split it into several requests",
                          param="input")


def check_vocab(info: ModelInfo, token_ids: list[int], field: str) -> None:
    """Every id within ``[0, vocab_size)`` (a min and a max in C; the index only when bad)."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= info.vocab_size):
        i, bad = next((i, t) for i, t in enumerate(token_ids)
                      if not 0 <= t < info.vocab_size)
        raise bad_request(f"{field}[{i}]: token id {bad} is outside the vocabulary of "
                          f"{info.name!r} ({info.vocab_size} tokens: ids 0 to "
                          f"{info.vocab_size - 1})", param=field)


def check_logit_bias(info: ModelInfo, logit_bias: dict[str, float] | None) -> None:
    """Every ``logit_bias`` key a token id of the model (the protocol checked the form)."""
    bad = [k for k in (logit_bias or {}) if int(k) >= info.vocab_size]
    if bad:
        raise bad_request(f"logit_bias: token id {bad[0]} is outside the vocabulary of "
                          f"{info.name!r} ({info.vocab_size} tokens: ids 0 to "
                          f"{info.vocab_size - 1})", param="logit_bias")


def check_length(info: ModelInfo, num_tokens: int, max_tokens: int, field: str,
                 max_tokens_sent: bool = True) -> None:
    """Refuse empty input and input that cannot fit the model's context."""
    if num_tokens == 0:
        raise bad_request(f"{field} is empty (0 tokens); at least 1 token is required",
                          param=field)
    limit = info.max_model_len
    if num_tokens + max_tokens <= limit:
        return
    if not max_tokens:
        raise bad_request(f"{field} has {num_tokens} tokens, more than this model's maximum "
                          f"context length max_model_len={limit}; shorten it", param=field)
    how = "" if max_tokens_sent else " (the default: max_tokens was not sent)"
    raise bad_request(f"{field} has {num_tokens} tokens + max_tokens {max_tokens}{how} = "
                      f"{num_tokens + max_tokens}, more than this model's maximum context "
                      f"length max_model_len={limit}; shorten the {field} or lower max_tokens",
                      param=field if num_tokens >= limit else "max_tokens")


def chat_max_tokens(info: ModelInfo, num_tokens: int, sent: int | None) -> int:
    """The chat's max_tokens: what the client sent, else what the context leaves."""
    if sent is not None:
        check_length(info, num_tokens, sent, "messages")
        return sent
    left = info.max_model_len - num_tokens
    if left < 1:
        raise bad_request(f"the rendered messages have {num_tokens} tokens, which leaves no "
                          f"room for a completion within this model's maximum context length "
                          f"max_model_len={info.max_model_len} (max_tokens was not sent: it "
                          f"defaults to what the context leaves, {info.max_model_len} - "
                          f"{num_tokens} = {left}); shorten the messages", param="messages")
    return left


def split_by_tokens(inputs: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive parts of ``inputs`` of at most ``max_tokens`` tokens each (an input
    longer than that is a part of its own)."""
    parts, part, size = [], [], 0
    for ids in inputs:
        if part and size + len(ids) > max_tokens:
            parts.append(part)
            part, size = [], 0
        part.append(ids)
        size += len(ids)
    if part:
        parts.append(part)
    return parts
