"""The ingress's side of tokenization: text in, token ids out, and token strings back
for logprobs. Replicas receive token ids only (they detokenize generated text with
their own copy of the tokenizer, so a stream's text deltas come from the engine).

Tokenizing never blocks the event loop for long: ``TokenizerPool`` runs inputs over
``INLINE_CHARS`` characters on a bounded pool of threads (the Rust tokenizer releases
the GIL while it encodes, and a chat template's rendering is interleaved with the loop
every switch interval), and small ones inline, where a thread hop would cost more than
the work. The ingress refuses text over ``http.max_prompt_chars`` before it gets here.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from deployments.http.errors import bad_request, overloaded
from worker.models.sources import resolve_model

INLINE_CHARS = 2048  # ~0.1 ms to tokenize: cheaper inline than on a thread
QUEUED_PER_THREAD = 8  # large inputs waiting per pool thread before a 429


class ModelTokenizer:
    """One model's tokenizer, loaded the way the engine loads it."""

    def __init__(self, model_spec: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_spec),
                                                       trust_remote_code=trust_remote_code)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with the model's special tokens (BOS, or [CLS] ... [SEP])."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens,
                                   verbose=False)["input_ids"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in one call (the Rust tokenizer runs them in parallel)."""
        return [list(ids) for ids in
                self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]

    def chat(self, messages: list[dict], add_generation_prompt: bool = True,
             add_special_tokens: bool = False, tools: list[dict] | None = None,
             continue_final_message: bool = False,
             template_kwargs: dict | None = None) -> list[int]:
        """The chat template rendered with the assistant's turn opened, as token ids
        (``add_special_tokens``: the tokenizer's own BOS on top of the template's;
        ``tools``: OpenAI tool definitions, which the template renders;
        ``continue_final_message``: the last message left open, to be continued;
        ``template_kwargs``: more variables for the template, vLLM's
        ``chat_template_kwargs``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use "
                              "/v1/completions with a prompt instead", param="messages")
        try:
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                tools=tools or None, **(template_kwargs or {}),
                **({"continue_final_message": True} if continue_final_message else {}),
                **({"add_special_tokens": True} if add_special_tokens else {}))
        except Exception as exc:  # noqa: BLE001 - a template error is the messages' fault
            raise bad_request(f"the chat template rejected these messages: {exc}",
                              param="messages") from None
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per ingress, lives as long
    def token_text(self, token_id: int) -> str:
        """A single token as text (for logprobs entries)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class TokenizerPool:
    """Where the ingress tokenizes: inline for small inputs, else on ``num_threads``
    threads with at most ``QUEUED_PER_THREAD`` inputs waiting per thread (more: 429)."""

    def __init__(self, num_threads: int):
        self.num_threads = num_threads
        self.max_queued = num_threads * QUEUED_PER_THREAD
        self.num_queued = 0
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="tokenize")

    async def run(self, num_chars: int, fn, *args):
        """``fn(*args)`` for an input of ``num_chars`` characters, off the loop if large."""
        if num_chars <= INLINE_CHARS:
            return fn(*args)
        if self.num_queued >= self.max_queued:
            raise overloaded(f"the ingress's tokenizer is busy: {self.num_queued} large inputs "
                             f"(over {INLINE_CHARS} characters) are waiting for its "
                             f"{self.num_threads} threads (http.tokenizer_threads)",
                             retry_after_s=1)
        self.num_queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.num_queued -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def embedding_json(vector: np.ndarray, encoding_format: str) -> str:
    """One embedding as JSON text: a float list, or a base64 string of little-endian
    float32 (what OpenAI's client decodes)."""
    if encoding_format == "base64":
        return '"' + base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode() + '"'
    return json.dumps(np.asarray(vector, dtype=np.float32).tolist(), separators=(",", ":"))
