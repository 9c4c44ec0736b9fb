"""One served model as the edge knows it: its configuration, its deployment handle, and
what the edge loads once for it (the replica's ``ModelInfo``, the tokenizer, the
structured-output checker). ``OpenAIService`` holds one per model, by name."""

from __future__ import annotations

import asyncio
import logging

from deployments.app.config import ModelArgs
from deployments.http.errors import APIError, bad_request, from_exception, unavailable
from deployments.http.tokens import ModelTokenizer
from deployments.replica.work import ModelInfo
from worker.core.errors import InvalidRequestError
from worker.params import Structured

logger = logging.getLogger("ray.serve")

INFO_TIMEOUT_S = 60.0  # a model's first replica may still be loading


_CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                      "guided_choice", "guided_grammar")


def constraint_field(body) -> str:
    """The body's field that carries its output constraint (for errors' ``param``)."""
    for name in _CONSTRAINT_FIELDS:
        value = getattr(body, name, None)
        if value is not None and getattr(value, "type", None) != "text":
            return name
    return "response_format"


class ServedModel:
    def __init__(self, config: ModelArgs, handle, loading: asyncio.Lock, created: int):
        self.name, self.config, self.handle, self.created = config.name, config, handle, created
        self._loading = loading  # one tokenizer load at a time: transformers' lazy imports race
        self._info: ModelInfo | None = None
        self._tokenizer: ModelTokenizer | APIError | None = None  # or why it has none
        self._grammars = None  # worker.generate.grammar.Grammars, built on first use

    @property
    def loaded_info(self) -> ModelInfo | None:
        """The info if a replica has already answered, else None (never waits)."""
        return self._info

    async def info(self, timeout: float = INFO_TIMEOUT_S) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await asyncio.wait_for(self.handle.model_info.remote(), timeout)
            except TimeoutError:
                raise unavailable(f"no replica of {self.name!r} answered within "
                                  f"{timeout:.0f} s (still loading?)") from None
            except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
                raise from_exception(exc) from None
        return self._info

    async def tokenizer(self) -> ModelTokenizer:
        """The model's tokenizer, loaded once; a model without one (a checkpoint saved
        without its tokenizer files) is a 400 for every request that needs text, with
        the loader's reason, and is not retried per request."""
        if self._tokenizer is None:
            async with self._loading:
                if self._tokenizer is None:
                    self._tokenizer = await self._load_tokenizer()
        if isinstance(self._tokenizer, APIError):
            raise self._tokenizer
        return self._tokenizer

    async def _load_tokenizer(self) -> ModelTokenizer | APIError:
        m = self.config
        try:
            return await asyncio.to_thread(ModelTokenizer, m.model,
                                           m.engine.trust_remote_code or False)
        except (OSError, ValueError, TypeError) as exc:
            return bad_request(f"{self.name!r} has no tokenizer the server can load "
                               f"({type(exc).__name__}: {exc}); this request needs one to "
                               "turn text into tokens", param="model")

    async def generator(self) -> tuple[ModelInfo, ModelTokenizer]:
        """Info and tokenizer of a model that generates; 400 for an embedding model."""
        info = await self.info()
        if not info.can_generate:
            raise bad_request(f"{self.name!r} is an embedding model: it serves "
                              "/v1/embeddings only", param="model")
        return info, await self.tokenizer()

    async def check_structured(self, structured: Structured | None,
                               field: str = "response_format") -> None:
        """A constraint that does not compile, or costs more than the model's grammar
        limits, is a 400 naming the client's ``field`` before anything is admitted (a
        stream could not turn it into a status later). Compiled grammars are cached, and
        the check runs on a thread (llguidance releases the GIL while it compiles)."""
        if structured is None:
            return
        if self._grammars is None:
            from worker.generate.grammar import Grammars  # llguidance (and torch), on first use

            tok, info = await self.tokenizer(), await self.info()
            self._grammars = Grammars(tok.tokenizer, info.vocab_size, frozenset(),
                                      self.config.engine_config().grammar_limits)
        try:
            await asyncio.to_thread(self._grammars.check, structured)
        except InvalidRequestError as exc:
            raise bad_request(f"{field}: {exc}", param=field) from None

    async def entry(self) -> dict:
        """This model's row of ``/v1/models`` (with packserve's facts once a replica has
        answered; a model still loading is listed without them)."""
        entry = {"id": self.name, "object": "model", "created": self.created,
                 "owned_by": "packserve", "root": self.config.model}
        info = self._info
        if info is None:
            try:
                info = await self.info(timeout=2.0)
            except APIError:
                return entry
        entry["packserve"] = {
            "tasks": info.tasks,
            "max_model_len": info.max_model_len, "capacity_tokens": info.capacity_tokens,
            "token_budget": info.token_budget, "dimensions": info.hidden_size,
            "smoke_test": info.smoke_test, "family": info.model_type,
            "proven": not info.unproven, "unproven": list(info.unproven)}
        if info.labels is not None:
            entry["packserve"]["labels"] = list(info.labels.labels)
        if info.smoke_test:
            entry["description"] = ("smoke-test model: random weights, its output is "
                                    "noise; swap in a real model id to serve text")
        return entry
