"""The OpenAI endpoints' logic: validate, tokenize, admit, route, format.

``OpenAIService`` knows nothing of HTTP framing (``deployments/ingress.py`` does); it
returns response bodies, or async iterators of server-sent-event strings for streams.
Every request holds an admission lease from before it is routed until it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from deployments.config import AppArgs
from deployments.errors import APIError, bad_request, from_exception, unavailable
from deployments.leases import AdmissionClient, Lease
from deployments.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.request_timer import UNTIMED, RequestTimer
from deployments.responses import (
    CompletionLogprobs,
    Envelope,
    chat_logprobs,
    merge_logprobs,
    sse,
    usage,
)
from deployments.tokens import ModelTokenizer, embedding_payload
from deployments.work import EmbedWork, GenerateWork, ModelInfo, ScoreWork

INFO_TIMEOUT_S = 60.0  # a model's first replica may still be loading


class OpenAIService:
    def __init__(self, args: AppArgs, models: dict, admission: AdmissionClient):
        self.args, self.handles, self.admission = args, models, admission
        self._infos: dict[str, ModelInfo] = {}
        self._tokenizers: dict[str, ModelTokenizer] = {}
        self._loading = asyncio.Lock()

    # ---- models ---------------------------------------------------------------------

    async def list_models(self) -> dict:
        data = []
        for m in self.args.models:
            entry = {"id": m.name, "object": "model", "created": 0, "owned_by": "packserve",
                     "root": m.model}
            info = self._infos.get(m.name)
            if info is None:
                try:
                    info = await self.info(m.name, timeout=2.0)
                except APIError:
                    info = None
            if info is not None:
                entry["packserve"] = {
                    "tasks": info.tasks,
                    "max_model_len": info.max_model_len, "capacity_tokens": info.capacity_tokens,
                    "token_budget": info.token_budget, "dimensions": info.hidden_size,
                    "smoke_test": info.smoke_test}
                if info.labels is not None:
                    entry["packserve"]["labels"] = list(info.labels.labels)
                if info.smoke_test:
                    entry["description"] = ("smoke-test model: random weights, its output is "
                                            "noise; swap in a real model id to serve text")
            data.append(entry)
        return {"object": "list", "data": data}

    def model(self, name: str):
        if name not in self.handles:
            served = ", ".join(self.handles)
            raise APIError(404, f"the model {name!r} does not exist; served models: {served}",
                           param="model", code="model_not_found")
        return self.handles[name]

    async def info(self, name: str, timeout: float = INFO_TIMEOUT_S) -> ModelInfo:
        info = self._infos.get(name)
        if info is None:
            try:
                info = await asyncio.wait_for(self.model(name).model_info.remote(), timeout)
            except APIError:
                raise
            except TimeoutError:
                raise unavailable(f"no replica of {name!r} answered within {timeout:.0f} s "
                                  "(still loading?)") from None
            except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
                raise from_exception(exc) from None
            self._infos[name] = info
        return info

    async def tokenizer(self, name: str) -> ModelTokenizer:
        tok = self._tokenizers.get(name)
        if tok is None:
            async with self._loading:  # one load at a time: transformers' lazy imports race
                tok = self._tokenizers.get(name)
                if tok is None:
                    m = self.args.model(name)
                    tok = await asyncio.to_thread(ModelTokenizer, m.model,
                                                  m.engine.trust_remote_code or False)
                    self._tokenizers[name] = tok
        return tok

    # ---- completions ----------------------------------------------------------------

    async def completions(self, body: CompletionRequest, timer: RequestTimer = UNTIMED):
        handle = self.model(body.model)
        info, tok = await self._generator(body.model)
        try:
            (prompt,) = body.prompts()
        except ValueError as exc:
            raise bad_request(str(exc), param="prompt") from None
        ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be >= 1, got 0 (0 is allowed only with "
                              "echo: true, which scores the prompt)", param="max_tokens")
        check_length(info, len(ids), max_tokens, "prompt")
        lease = await self.admission.reserve(body.model, len(ids) + max_tokens)
        env = Envelope("cmpl", "text_completion", body.model)
        lp = CompletionLogprobs(tok) if body.logprobs is not None else None
        prompt_text = tok.decode(ids) if body.echo else ""
        prompt_lp = None
        try:
            if body.echo and lp is not None:
                scores = await self._call(handle.score,
                                          ScoreWork(lease.lease_id, len(ids), [ids]), timer)
                prompt_lp = lp.prompt(ids, scores[0])
            if max_tokens == 0:
                choice = {"index": 0, "text": prompt_text, "logprobs": prompt_lp,
                          "finish_reason": "length"}
                return env.body(choices=[choice], usage=usage(len(ids), 0))
            work = GenerateWork(lease.lease_id, len(ids) + max_tokens, ids,
                                body.sampling_params(max_tokens, body.logprobs))
        except BaseException:
            lease.release()
            raise
        if body.stream:
            return self._stream_completion(handle, work, lease, env, lp, prompt_text,
                                           prompt_lp, body.include_usage, timer)
        out = await self._generate(handle, work, lease, timer)
        gen_lp = lp.generated(out.token_ids, out.logprobs) if lp and out.logprobs else None
        choice = {"index": 0, "text": prompt_text + (out.text or ""),
                  "logprobs": merge_logprobs(prompt_lp, gen_lp),
                  "finish_reason": out.finish_reason.value}
        return env.body(choices=[choice], usage=usage(len(ids), len(out.token_ids),
                                                      out.num_cached_tokens))

    def _stream_completion(self, handle, work, lease, env, lp, prompt_text, prompt_lp,
                           include_usage, timer) -> AsyncIterator[str]:
        echo = {"text": prompt_text, "logprobs": prompt_lp}  # the first chunk carries the prompt

        def choice(delta) -> dict:
            gen_lp = (lp.generated(delta.token_ids, delta.logprobs)
                      if lp and delta.logprobs else None)
            out = {"index": 0, "text": echo["text"] + delta.text,
                   "logprobs": merge_logprobs(echo["logprobs"], gen_lp),
                   "finish_reason": finish(delta)}
            echo.update(text="", logprobs=None)
            return out

        return self._events(handle, work, lease, env, timer, include_usage, choice)

    # ---- chat -----------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, timer: RequestTimer = UNTIMED):
        handle = self.model(body.model)
        info, tok = await self._generator(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise bad_request(str(exc), param="messages") from None
        ids = tok.chat(messages)
        max_tokens = body.token_limit() or max(1, info.max_model_len - len(ids))
        check_length(info, len(ids), max_tokens, "the rendered messages")
        k = (body.top_logprobs or 0) if body.logprobs else None
        work = GenerateWork(None, len(ids) + max_tokens, ids, body.sampling_params(max_tokens, k))
        lease = await self.admission.reserve(body.model, work.num_tokens)
        work = GenerateWork(lease.lease_id, work.num_tokens, ids, work.params)
        env = Envelope("chatcmpl", "chat.completion", body.model)
        if body.stream:
            env.object = "chat.completion.chunk"
            return self._stream_chat(handle, work, lease, env, tok, body.include_usage, timer)
        out = await self._generate(handle, work, lease, timer)
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text or ""},
                  "logprobs": chat_logprobs(tok, out.token_ids, out.logprobs),
                  "finish_reason": out.finish_reason.value}
        return env.body(choices=[choice], usage=usage(len(ids), len(out.token_ids),
                                                      out.num_cached_tokens))

    def _stream_chat(self, handle, work, lease, env, tok, include_usage, timer
                     ) -> AsyncIterator[str]:
        def choice(delta) -> dict:
            return {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": chat_logprobs(tok, delta.token_ids, delta.logprobs),
                    "finish_reason": finish(delta)}

        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        return self._events(handle, work, lease, env, timer, include_usage, choice, first)

    # ---- embeddings -----------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, timer: RequestTimer = UNTIMED) -> dict:
        handle = self.model(body.model)
        info = await self.info(body.model)
        tok = await self.tokenizer(body.model)
        inputs = [tok.encode(x) if isinstance(x, str) else list(x) for x in body.inputs()]
        if not inputs:
            raise bad_request("input is empty: send a string, a list of strings, or token "
                              "id arrays", param="input")
        for i, ids in enumerate(inputs):
            check_length(info, len(ids), 0, f"input[{i}]")
        if body.dimensions is not None and body.dimensions != info.hidden_size:
            raise bad_request(f"dimensions={body.dimensions} is not supported by "
                              f"{body.model!r}: its embeddings have {info.hidden_size}",
                              param="dimensions")
        total = sum(len(ids) for ids in inputs)
        m = self.args.model(body.model)
        lease = await self.admission.reserve(body.model, total, clamp=True)
        try:
            vectors = await self._call(handle.embed, EmbedWork(lease.lease_id, lease.tokens,
                                                               inputs, m.pooling, m.normalize),
                                       timer)
        finally:
            lease.release()
        data = [{"object": "embedding", "index": i,
                 "embedding": embedding_payload(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # ---- plumbing -------------------------------------------------------------------

    async def _generator(self, name: str) -> tuple[ModelInfo, ModelTokenizer]:
        info = await self.info(name)
        if not info.can_generate:
            raise bad_request(f"{name!r} is an embedding model: it serves /v1/embeddings "
                              "only", param="model")
        return info, await self.tokenizer(name)

    async def _generate(self, handle, work: GenerateWork, lease: Lease, timer: RequestTimer):
        try:
            out = await self._call(handle.generate, work, timer)
        finally:
            lease.release()
        timer.generated(len(out.token_ids))
        return out

    @staticmethod
    async def _call(method, work, timer: RequestTimer = UNTIMED):
        timer.dispatched()
        try:
            return await method.remote(work)
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
            raise from_exception(exc) from None

    async def _events(self, handle, work, lease, env, timer, include_usage, choice,
                      first: dict | None = None) -> AsyncIterator[str]:
        """The server-sent events of a streamed completion or chat: an optional first
        chunk, one chunk per delta (``choice(delta)``), usage if asked, ``[DONE]``."""
        if first is not None:
            yield sse(env.body(choices=[first]))
        num_generated = num_cached = 0
        async with aclosing(self._stream(handle, work, lease, timer)) as deltas:
            async for delta in deltas:
                if isinstance(delta, APIError):
                    yield sse(delta.body())
                    break
                num_generated += len(delta.token_ids)
                num_cached = delta.num_cached_tokens
                yield sse(env.body(choices=[choice(delta)]))
        if include_usage:
            yield sse(env.body(choices=[], usage=usage(len(work.prompt_token_ids), num_generated,
                                                       num_cached)))
        yield sse("[DONE]")

    @staticmethod
    async def _stream(handle, work: GenerateWork, lease: Lease, timer: RequestTimer):
        """Deltas from the replica; an error mid-stream is yielded as an ``APIError``.
        Closing this generator cancels the replica's stream (which aborts the request)."""
        timer.dispatched()
        stream = handle.options(stream=True).generate_stream.remote(work)
        try:
            async for delta in stream:
                timer.delta(len(delta.token_ids))
                yield delta
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            yield from_exception(exc)
        finally:
            stream.cancel()
            lease.release()


def finish(delta) -> str | None:
    return delta.finish_reason.value if delta.finish_reason else None


def check_length(info: ModelInfo, num_tokens: int, max_tokens: int, what: str) -> None:
    """Refuse empty input and input that cannot fit the model's context."""
    if num_tokens == 0:
        raise bad_request(f"{what} is empty (0 tokens); at least 1 token is required")
    if num_tokens + max_tokens > info.max_model_len:
        detail = (f"{num_tokens} tokens" if not max_tokens else
                  f"{num_tokens} tokens + max_tokens {max_tokens} = {num_tokens + max_tokens}")
        raise bad_request(f"{what} has {detail}, more than this model's maximum context "
                          f"length max_model_len={info.max_model_len}; shorten it"
                          + (" or lower max_tokens" if max_tokens else ""))
