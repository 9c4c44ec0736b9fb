"""The OpenAI endpoints' logic: validate, tokenize, admit, route, format.

``OpenAIService`` knows nothing of HTTP framing (``deployments/http/ingress.py`` does); it
returns response bodies (dicts, or bytes for embeddings), or async iterators of
server-sent-event strings for streams (``deployments/http/streaming.py``). Every request
holds an admission lease from before it is routed until it ends. Limits are checked
before the work they protect: characters before tokenizing, tokens before admission.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time

import numpy as np

from deployments.http import streaming

from deployments.http import tools
from deployments.app.config import AppArgs
from deployments.http.errors import APIError, bad_request, constraint_failed, from_exception
from deployments.admission.leases import AdmissionClient, Lease
from deployments.http.limits import (
    chat_max_tokens,
    check_chars,
    check_embedding_inputs,
    check_length,
    check_logit_bias,
    check_vocab,
    split_by_tokens,
)
from deployments.app.process import rss_bytes, trim_memory
from deployments.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
)
from deployments.http.request_timer import UNTIMED, RequestTimer
from deployments.http.responses import (
    CompletionLogprobs,
    Envelope,
    chat_logprobs,
    embeddings_body,
    merge_logprobs,
    stop_string,
    text_length,
    token_logprobs,
    usage,
)
from deployments.replica.streams import Entry, StreamReceiver
from deployments.http.loras import AdapterRegistry, ServedAdapter
from deployments.http.served import ServedModel, constraint_field
from deployments.http.tokens import ModelTokenizer, TokenizerPool
from deployments.replica.work import EmbedWork, GenerateWork, ModelInfo, Refusal, ScoreWork

logger = logging.getLogger("ray.serve")

PART_WAIT_S = 60.0  # a large embedding request waits this long for room for each later part
LARGE_RESPONSE_BYTES = 8 << 20  # after building a body this large, give the heap back


class OpenAIService:
    def __init__(self, args: AppArgs, models: dict, admission: AdmissionClient, metrics=None):
        self.args, self.admission = args, admission
        self.lease_rule = args.admission.make_lease_rule()
        self.metrics = metrics  # IngressMetrics, or None
        self.limits = args.http
        self.pool = TokenizerPool(args.http.tokenizer_threads)
        self.streams = StreamReceiver() if args.http.stream_transport == "channel" else None
        loading, created = asyncio.Lock(), int(time.time())
        self.served = {m.name: ServedModel(m, models[m.name], loading, created)
                       for m in args.models if m.name in models}
        self.loras = AdapterRegistry(args, created)

    # ---- models ---------------------------------------------------------------------

    async def list_models(self) -> dict:
        data = []
        for m in self.served.values():  # per served model: it, then its adapters
            data.append(await m.entry())
            data += [self.loras.entry(a) for a in self.loras.of_model(m.name)]
        return {"object": "list", "data": data}

    async def model_entry(self, name: str) -> dict:
        model, adapter = self.loras.resolve(name, self.served)
        return self.loras.entry(adapter) if adapter else await self.served[model].entry()

    async def load_lora(self, body: LoadLoRARequest) -> dict:
        adapter = await self.loras.load(body.lora_name, body.lora_path, body.base_model_name,
                                        self.served)
        return self.loras.entry(adapter)

    async def unload_lora(self, body: UnloadLoRARequest) -> dict:
        adapter = await self.loras.unload(body.lora_name)
        return {"id": adapter.name, "object": "model", "deleted": True}

    async def warm_up(self) -> None:
        """Load every model's info and tokenizer before the first request needs them (a
        model still loading is retried), and export its request counters at 0."""
        for m in self.served.values():
            while True:
                try:
                    info = await m.info()
                    break
                except APIError:
                    await asyncio.sleep(1.0)
            try:
                await m.tokenizer()
            except Exception as exc:  # noqa: BLE001 - token-id requests still work
                logger.warning("no tokenizer for %s: %s", m.name, exc)
            if self.metrics is not None:
                try:
                    self.metrics.export_zeros({m.name: tuple(info.tasks)})
                except Exception:
                    logger.exception("ingress metrics failed")

    def model(self, name: str) -> ServedModel:
        """The served model ``name``; 404 naming the served ones otherwise, 400 for an
        adapter (this endpoint runs base models only)."""
        served = self.served.get(name)
        if served is None and (name in self.loras or ":" in name):
            try:
                parent, adapter = self.loras.resolve(name, self.served)
            except APIError:
                adapter = None  # neither: the 404 below
            if adapter is not None:
                raise bad_request(f"{name!r} is a LoRA adapter of {parent!r}; adapters serve "
                                  "/v1/completions, /v1/chat/completions and /v1/responses; "
                                  f"ask {parent!r} itself here", param="model")
        if served is None:
            names = ", ".join(self.served)
            raise APIError(404, f"the model {name!r} does not exist; served models: {names}",
                           param="model", code="model_not_found")
        return served

    def state(self) -> dict:
        """What this ingress holds now (tests check it drains; operators read it)."""
        return {"tokenizer_queued": self.pool.num_queued, "rss_bytes": rss_bytes(),
                "open_streams": self.streams.num_open if self.streams else 0}

    # ---- completions ----------------------------------------------------------------

    def generator_model(self, name: str) -> tuple[ServedModel, ServedAdapter | None]:
        """The served model and LoRA adapter (or None) a generation request names."""
        model, adapter = self.loras.resolve(name, self.served)
        return self.served[model], adapter

    async def completions(self, body: CompletionRequest, timer: RequestTimer = UNTIMED):
        """One choice set of ``n`` per prompt (``prompt`` may be a list): choice index =
        prompt index x n + i, OpenAI's order; usage sums the prompts."""
        served, adapter = self.generator_model(body.model)
        handle = served.handle
        info, tok = await served.generator()
        many = len(body.prompt) > 1
        prompts = [body.truncated(await self._prompt_ids(
            info, tok, p, f"prompt[{j}]" if many else "prompt"), info.max_model_len)
            for j, p in enumerate(body.prompt)]
        sent = "max_tokens" in body.model_fields_set and body.max_tokens is not None
        max_tokens = body.max_tokens if sent else 16
        if max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens must be >= 1, got 0 (0 is allowed only with "
                              "echo: true, which scores the prompt)", param="max_tokens")
        for j, ids in enumerate(prompts):
            check_length(info, len(ids), max_tokens, f"prompt[{j}]" if many else "prompt",
                         max_tokens_sent=sent)
        check_logit_bias(info, body.logit_bias)
        await served.check_structured(body.structured(), constraint_field(body))
        n, num_prompt = body.n, sum(len(ids) for ids in prompts)
        leases = []
        try:
            for ids in prompts:  # all or none
                leases += await self._reserve(served.name, len(ids), max_tokens, n)
        except BaseException:
            _release(leases)
            raise
        env = Envelope("cmpl", "text_completion", body.model)
        logprobs = body.logprobs is not None
        try:
            texts, prompt_lps = [], []
            for j, ids in enumerate(prompts):
                texts.append(await self.pool.run(4 * len(ids), tok.decode, ids)
                             if body.echo else "")
                prompt_lp = None
                if body.echo and logprobs:
                    if adapter is not None:
                        raise bad_request("echo with logprobs scores the prompt, which "
                                          "LoRA adapters do not serve yet", param="echo")
                    scores = await self._call(handle.score, ScoreWork(
                        leases[j * n].lease_id, len(ids), [ids]), timer)
                    prompt_lp = CompletionLogprobs(tok).prompt(ids, scores[0])
                prompt_lps.append(prompt_lp)
            if max_tokens == 0:
                choices = [{"index": j * n + i, "text": texts[j], "logprobs": prompt_lps[j],
                            "finish_reason": "length"}
                           for j in range(len(prompts)) for i in range(n)]
                total = usage(num_prompt, 0)
                _release(leases)
                if body.stream:
                    return streaming.single(choices, env, total if body.include_usage else None)
                return env.body(choices=choices, usage=total)
            works = [GenerateWork(leases[j * n + i].lease_id, leases[j * n + i].tokens, ids,
                                  body.sampling_params(max_tokens, body.logprobs, i),
                                  *lora_of(adapter))
                     for j, ids in enumerate(prompts) for i in range(n)]
        except BaseException:
            _release(leases)
            raise
        stops = _stops(body)
        # per choice c = j * n + i: its logprobs builder, from where its generated text starts
        lps = [CompletionLogprobs(tok, text_length(prompt_lps[c // n])) if logprobs else None
               for c in range(len(works))]
        if body.stream:
            first = [True] * len(works)  # each choice's first chunk carries the prompt
            seen = [([], "") for _ in works]  # ids and text so far, for a stop string

            def choice(c: int, entry: Entry) -> dict:
                gen_lp = (lps[c].generated(entry.token_ids, token_logprobs(entry.logprobs))
                          if lps[c] and entry.logprobs else None)
                echo, first[c] = first[c], False
                text = entry.text
                if stops:
                    ids, before = seen[c]
                    ids += entry.token_ids
                    seen[c] = (ids, before + text)
                    if entry.finish_reason == "stop":
                        text += stop_string(tok, ids, before + text, stops,
                                            body.skip_special_tokens)
                return {"index": c, "text": (texts[c // n] if echo else "") + text,
                        "logprobs": merge_logprobs(prompt_lps[c // n] if echo else None, gen_lp),
                        "finish_reason": entry.finish_reason}

            return streaming.events(self._choices(handle, works, timer), env, choice,
                                    num_prompt, body.include_usage,
                                    on_end=lambda: _release(leases))
        outs = await self._generate_all(handle, works, leases, timer)
        choices = []
        for c, out in enumerate(outs):
            gen_lp = lps[c].generated(out.token_ids, out.logprobs) if lps[c] and out.logprobs \
                else None
            text = out.text or ""
            if stops and out.finish_reason.value == "stop":
                text += stop_string(tok, out.token_ids, text, stops, body.skip_special_tokens)
            choices.append({"index": c, "text": texts[c // n] + text,
                            "logprobs": merge_logprobs(prompt_lps[c // n], gen_lp),
                            "finish_reason": out.finish_reason.value})
        return env.body(choices=choices, usage=_usage_of_prompts(
            [len(ids) for ids in prompts], outs, n))

    # ---- chat -----------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, timer: RequestTimer = UNTIMED):
        served, adapter = self.generator_model(body.model)
        handle = served.handle
        info, tok = await served.generator()
        messages = [m.rendered() for m in body.messages]
        chars = sum(len(m["content"]) for m in messages)
        check_chars(chars, self.limits.max_prompt_chars, "messages")
        functions = [t.function.model_dump(exclude_none=True) for t in body.tools or ()]
        options = body.template_options()
        ids = await self.pool.run(chars, functools.partial(
            tok.chat, messages, options["add_generation_prompt"], False,
            [{"type": "function", "function": f} for f in functions],
            options["continue_final_message"], options["template_kwargs"]))
        ids = body.truncated(ids, info.max_model_len)
        max_tokens = chat_max_tokens(info, len(ids), body.token_limit())
        check_logit_bias(info, body.logit_bias)
        mode, named = body.tool_mode()
        structured = (tools.constraint(functions, mode, body.parallel_tool_calls, named)
                      if functions else None) or body.structured()
        if functions and mode in ("required", "named"):
            await self._check_tools(served, structured, functions, mode, named)
        else:
            await served.check_structured(structured, constraint_field(body))
        names = {f["name"] for f in functions} if mode != "none" else set()
        k = (body.top_logprobs or 0) if body.logprobs else None
        leases = await self._reserve(served.name, len(ids), max_tokens, body.n)
        try:
            works = [GenerateWork(lease.lease_id, lease.tokens, ids, dataclasses.replace(
                         body.sampling_params(max_tokens, k, i), structured=structured),
                         *lora_of(adapter))
                     for i, lease in enumerate(leases)]
        except BaseException:
            _release(leases)
            raise
        stops = _stops(body)
        env = Envelope("chatcmpl", "chat.completion", body.model)
        if body.stream:
            env.object = "chat.completion.chunk"
            calls = [tools.ToolStream(names) for _ in range(body.n)]
            seen = [([], "") for _ in range(body.n)]  # ids and text so far, for a stop string

            def choice(i: int, entry: Entry) -> dict:
                delta, finish, text = {}, entry.finish_reason, entry.text
                if stops:
                    ids_so_far, before = seen[i]
                    ids_so_far += entry.token_ids
                    seen[i] = (ids_so_far, before + text)
                    if finish == "stop":
                        text += stop_string(tok, ids_so_far, before + text, stops,
                                            body.skip_special_tokens)
                text = calls[i].feed(text) if names else text
                if names and finish is not None:
                    rest, found = calls[i].finish(cut=finish == "length")
                    text += rest
                    if found:
                        delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(found)]
                        finish = "tool_calls" if finish == "stop" else finish
                if text:
                    delta["content"] = text
                return {"index": i, "delta": delta,
                        "logprobs": chat_logprobs(tok, entry.token_ids,
                                                  token_logprobs(entry.logprobs)),
                        "finish_reason": finish}

            first = [{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for i in range(body.n)]
            return streaming.events(self._choices(handle, works, timer), env, choice, len(ids),
                                    body.include_usage, first,
                                    on_end=lambda: _release(leases))
        outs = await self._generate_all(handle, works, leases, timer)
        choices = []
        for i, out in enumerate(outs):
            finish, text = out.finish_reason.value, out.text or ""
            if stops and finish == "stop":
                text += stop_string(tok, out.token_ids, text, stops, body.skip_special_tokens)
            message = {"role": "assistant", "content": text}
            if names:
                content, found = tools.parse(text, names, cut=finish == "length")
                if found:
                    message = {"role": "assistant", "content": content, "tool_calls": found}
                    finish = "tool_calls" if finish == "stop" else finish
                else:
                    message["content"] = content or ""
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(tok, out.token_ids, out.logprobs),
                            "finish_reason": finish})
        return env.body(choices=choices, usage=_usage(len(ids), outs))

    async def _check_tools(self, served: ServedModel, structured, functions: list[dict],
                           mode: str, named: str | None) -> None:
        """A tool_choice's grammar compiles, or a 400 naming the tool whose parameters
        do not (``tools[i].function.parameters``), never ``response_format``."""
        try:
            await served.check_structured(structured, "tools")
        except APIError as err:
            for i, f in enumerate(functions):
                if mode == "named" and f["name"] != named:
                    continue
                field = f"tools[{i}].function.parameters"
                try:
                    one = tools.constraint([f], "named", False, f["name"])
                    await served.check_structured(one, field)
                except APIError as bad:
                    raise bad_request(bad.message, param=field) from None
            raise bad_request(err.message, param="tools") from None

    # ---- tokenize -------------------------------------------------------------------

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: the ids completions (``prompt``) or chat (``messages``) would
        run, with the same defaults, so ``count`` is their ``usage.prompt_tokens``."""
        served, _ = self.generator_model(body.model)  # an adapter tokenizes as its base
        info, tok = await served.info(), await served.tokenizer()
        if body.prompt is not None:
            check_chars(len(body.prompt), self.limits.max_prompt_chars, "prompt")
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await self.pool.run(len(body.prompt), tok.encode, body.prompt, special)
        else:
            messages = [m.rendered() for m in body.messages]  # as chat renders them
            chars = sum(len(m["content"]) for m in messages)
            check_chars(chars, self.limits.max_prompt_chars, "messages")
            functions = [{"type": "function", "function": t.function.model_dump(
                exclude_none=True)} for t in body.tools or ()]
            options = body.template_options()
            ids = await self.pool.run(chars, functools.partial(
                tok.chat, messages, options["add_generation_prompt"],
                bool(body.add_special_tokens), functions, options["continue_final_message"],
                options["template_kwargs"]))
        out = {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids,
               "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [tok.token_text(t) for t in ids]
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        served = self.model(body.model)
        info, tok = await served.info(), await served.tokenizer()
        check_vocab(info, body.tokens, "tokens")
        return {"prompt": await self.pool.run(4 * len(body.tokens), tok.decode, body.tokens)}

    # ---- embeddings -----------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, timer: RequestTimer = UNTIMED) -> bytes:
        served = self.model(body.model)
        handle, info = served.handle, await served.info()
        check_embedding_inputs(len(body.input), self.limits.max_embedding_inputs)
        if isinstance(body.input[0], str):
            chars = sum(len(x) for x in body.input)
            check_chars(chars, self.limits.max_prompt_chars, "input")
            tok = await served.tokenizer()
            inputs = await self.pool.run(chars, tok.encode_batch, body.input)
        else:
            for i, ids in enumerate(body.input):
                check_vocab(info, ids, f"input[{i}]")
            inputs = body.input
        for i, ids in enumerate(inputs):
            check_length(info, len(ids), 0, f"input[{i}]")
        if body.dimensions is not None and body.dimensions != info.hidden_size:
            raise bad_request(f"dimensions={body.dimensions} is not supported by "
                              f"{body.model!r}: its embeddings have {info.hidden_size}",
                              param="dimensions")
        vectors = await self._embed_in_parts(handle, body.model, info, inputs, timer)
        total = sum(len(ids) for ids in inputs)
        out = embeddings_body(vectors, body.encoding_format, body.model, total)
        if len(out) > LARGE_RESPONSE_BYTES:
            trim_memory()
        return out

    async def _embed_in_parts(self, handle, model: str, info: ModelInfo, inputs, timer
                              ) -> np.ndarray:
        """Embed ``inputs`` in parts of at most half a replica's capacity, one lease each,
        so one large list never holds the whole pool while others wait. The first part
        is admitted or refused like any request; later ones wait for room."""
        m = self.args.model(model)
        parts = split_by_tokens(inputs, max(info.max_model_len, info.capacity_tokens // 2))
        vectors = []
        for i, part in enumerate(parts):
            tokens = sum(len(ids) for ids in part)
            lease = await (self.admission.reserve(model, tokens, clamp=True) if i == 0 else
                           self.admission.reserve_waiting(model, tokens, PART_WAIT_S))
            try:
                work = EmbedWork(lease.lease_id, lease.tokens, part, m.pooling, m.normalize)
                vectors.append(await self._call(handle.embed, work, timer))
            finally:
                lease.release()
        return vectors[0] if len(vectors) == 1 else np.concatenate(vectors)

    # ---- plumbing -------------------------------------------------------------------

    async def _prompt_ids(self, info: ModelInfo, tok: ModelTokenizer, prompt,
                          field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            check_chars(len(prompt), self.limits.max_prompt_chars, field)
            return await self.pool.run(len(prompt), tok.encode, prompt)
        check_vocab(info, prompt, field)
        return prompt

    async def _reserve(self, model: str, num_prompt: int, max_tokens: int, n: int
                       ) -> list[Lease]:
        """One lease per choice (each choice runs as its own sequence), by the lease
        rule: the prompt and a first allotment, grown as it generates; all or none."""
        ask = self.lease_rule.ask(num_prompt, max_tokens)
        leases = []
        try:
            for _ in range(n):  # per choice
                leases.append(await self.admission.reserve(model, ask))
        except BaseException:
            _release(leases)
            raise
        return leases

    def _entries(self, handle, work: GenerateWork, timer: RequestTimer):
        if self.streams is not None:
            entries = streaming.channel_entries(self.streams, handle, work, timer)
        else:
            entries = streaming.handle_entries(handle, work, timer)
        return entries if work.lora is None else self._held(work.lora, entries)

    async def _held(self, lora: str, entries):
        """``entries`` while counted as a request of adapter ``lora`` (unload: 409)."""
        self.loras.hold(lora)
        try:
            async for entry in entries:
                yield entry
        finally:
            self.loras.release(lora)

    def _choices(self, handle, works: list[GenerateWork], timer: RequestTimer):
        return streaming.merged([self._entries(handle, w, timer) for w in works])

    async def _generate_all(self, handle, works: list[GenerateWork], leases: list[Lease],
                            timer: RequestTimer) -> list:
        """Every choice's output, in order; the first failure cancels the others."""
        if len(works) == 1:
            return [await self._generate(handle, works[0], leases[0], timer)]
        tasks = [asyncio.ensure_future(self._generate(handle, w, lease, timer))
                 for w, lease in zip(works, leases)]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            _release(leases)  # a task cancelled before it started never released its own

    async def _generate(self, handle, work: GenerateWork, lease: Lease, timer: RequestTimer):
        self.loras.hold(work.lora)
        try:
            out = await self._call(handle.generate, work, timer)
        finally:
            lease.release()
            self.loras.release(work.lora)
        if out.error is not None:  # finish "error": the grammar refused every continuation
            raise constraint_failed(out.error)
        timer.generated(len(out.token_ids))
        return out

    @staticmethod
    async def _call(method, work, timer: RequestTimer = UNTIMED):
        timer.dispatched()
        try:
            result = await method.remote(work)
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
            raise from_exception(exc) from None
        if isinstance(result, Refusal):
            raise from_exception(result.error)
        return result


def lora_of(adapter: ServedAdapter | None) -> tuple[str | None, str | None]:
    """``GenerateWork``'s adapter fields."""
    return (None, None) if adapter is None else (adapter.name, adapter.path)


def _release(leases: list[Lease]) -> None:
    for lease in leases:
        lease.release()


def _stops(body) -> tuple[str, ...]:
    """The stop strings to put back into the output (``include_stop_str_in_output``)."""
    if not body.include_stop_str_in_output or not body.stop:
        return ()
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)


def _usage_of_prompts(num_prompt_tokens: list[int], outs: list, n: int) -> dict:
    """Usage of ``n`` choices of each prompt: the prompts summed, each counted once."""
    groups = [outs[j * n:(j + 1) * n] for j in range(len(num_prompt_tokens))]
    parts = [_usage(k, g) for k, g in zip(num_prompt_tokens, groups)]
    return usage(sum(p["prompt_tokens"] for p in parts),
                 sum(p["completion_tokens"] for p in parts),
                 sum(p["prompt_tokens_details"]["cached_tokens"] for p in parts))


def _usage(num_prompt_tokens: int, outs: list) -> dict:
    """Usage of ``n`` choices of one prompt: the prompt counted once, as OpenAI does, and
    its cached tokens as it found the cache (the least over the choices: the others may
    take the blocks the first one computed)."""
    return usage(num_prompt_tokens, sum(len(o.token_ids) for o in outs),
                 min(o.num_cached_tokens for o in outs))
