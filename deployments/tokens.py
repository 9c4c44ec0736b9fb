"""The ingress's side of tokenization: text in, token ids out, and token strings back
for logprobs. Replicas receive token ids only (they detokenize generated text with
their own copy of the tokenizer, so a stream's text deltas come from the engine)."""

from __future__ import annotations

import base64
import functools

import numpy as np

from deployments.errors import bad_request
from worker.sources import resolve_model


class ModelTokenizer:
    """One model's tokenizer, loaded the way the engine loads it."""

    def __init__(self, model_spec: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_spec),
                                                       trust_remote_code=trust_remote_code)

    def encode(self, text: str) -> list[int]:
        """Token ids with the model's special tokens (BOS, or [CLS] ... [SEP])."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def chat(self, messages: list[dict]) -> list[int]:
        """The chat template rendered with the assistant's turn opened, as token ids."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use "
                              "/v1/completions with a prompt instead", param="messages")
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
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


def embedding_payload(vector: np.ndarray, encoding_format: str):
    """A float list, or base64 of little-endian float32 (what OpenAI's client decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()
