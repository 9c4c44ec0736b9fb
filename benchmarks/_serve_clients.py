"""The load generators of ``benchmarks/serve_load.py``: one streamed completion per
request, timed the same way on every path, and the summary of a run.

| sender          | path                                                           |
|-----------------|----------------------------------------------------------------|
| ``engine_sender``| ``Engine.generate_stream`` in-process (a message = a delta)    |
| ``http_sender`` | the official ``openai`` client (a message = an SSE chunk)      |
| ``lean_sender`` | aiohttp, SSE lines counted, only the usage chunk parsed        |
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Req:
    arrival_s: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Result:
    status: int = 0
    start: float = 0.0
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    num_tokens: int = 0
    message_times: list[float] = field(default_factory=list)  # perf_counter of each message

    def message(self) -> None:
        now = time.perf_counter()
        if not self.message_times:
            self.ttft_s = now - self.start
        self.message_times.append(now)


def engine_sender(engine):
    from worker.generate.sampling import SamplingParams

    async def send(req: Req) -> Result:
        res = Result(start=time.perf_counter())
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0, ignore_eos=True)
        async for delta in engine.generate_stream(req.prompt, params):
            if delta.token_ids:
                res.message()
            res.num_tokens += len(delta.token_ids)
        res.status, res.e2e_s = 200, time.perf_counter() - res.start
        return res

    return send


def _body(model: str, req: Req) -> dict:
    return {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


@contextlib.asynccontextmanager
async def http_sender(base_url: str, model: str, concurrency: int):
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)

    async def send(req: Req) -> Result:
        res = Result(start=time.perf_counter())
        try:
            body = _body(model, req)
            stream = await client.completions.create(
                model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0,
                stream=True, stream_options=body["stream_options"],
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    res.message()
                if chunk.usage is not None:
                    res.num_tokens = chunk.usage.completion_tokens
            res.status = 200
        except openai.RateLimitError:
            res.status = 429
        except openai.APIStatusError as exc:
            res.status = exc.status_code
        res.e2e_s = time.perf_counter() - res.start
        return res

    async with client:
        yield send


@contextlib.asynccontextmanager
async def lean_sender(base_url: str, model: str, concurrency: int):
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(req: Req) -> Result:
            res = Result(start=time.perf_counter())
            async with session.post(f"{base_url}/completions", json=_body(model, req)) as r:
                res.status = r.status
                if r.status == 200:
                    async for line in r.content:  # one SSE line per iteration
                        if not line.startswith(b"data: {"):
                            continue
                        if b'"usage":' in line and b'"choices":[]' in line.replace(b" ", b""):
                            res.num_tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                        else:
                            res.message()
                else:
                    await r.read()
            res.e2e_s = time.perf_counter() - res.start
            return res

        yield send


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.status == 200]
    ttft = np.array([r.ttft_s for r in ok])
    generated = sum(r.num_tokens for r in ok)
    messages = sum(len(r.message_times) for r in ok)
    itl = np.concatenate([np.diff(r.message_times) for r in ok] or [np.zeros(0)])
    tpot = np.array([(r.e2e_s - r.ttft_s) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1])

    def pct(a, q):
        return float(np.percentile(a, q)) * 1000 if len(a) else None

    return {"num_requests": len(results), "num_ok": len(ok),
            "rate_429": sum(r.status == 429 for r in results) / len(results),
            "other_errors": sorted({r.status for r in results} - {200, 429}),
            "wall_s": wall_s, "requests_per_s": len(ok) / wall_s,
            "generated_tokens": generated, "generated_tokens_per_s": generated / wall_s,
            "messages": messages, "messages_per_token": messages / max(generated, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99)}
