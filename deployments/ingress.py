"""The HTTP edge: a FastAPI app served by Ray Serve (``@serve.ingress``).

Framing only: routes, API-key auth, the body size limit, every error rendered in
OpenAI's format (``deployments/errors.py``), and per-request metrics (status, TTFT, TPOT,
e2e: ``deployments/request_timer.py``, the outermost middleware, so that 401s, 413s and
invalid bodies are counted too). The endpoints' logic lives in
``deployments/openai_api.py``.
"""

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.classify_api import ClassifyService
from deployments.classify_protocol import ClassifyRequest, RerankRequest, ScoreRequest
from deployments.config import AppArgs
from deployments.errors import APIError, from_exception
from deployments.leases import AdmissionClient
from deployments.openai_api import OpenAIService
from deployments.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from deployments.request_timer import RequestMetrics, set_recorder, timer

logger = logging.getLogger("ray.serve")

app = FastAPI(title="packserve", description="OpenAI-compatible, padding-free LLM serving")
OPEN_PATHS = ("/health", "/docs", "/openapi.json")
_EDGE: dict = {"api_key": None, "max_body_bytes": None}  # set once per ingress process


def set_edge(api_key: str | None, max_body_bytes: int) -> None:
    """The auth key and body limit of this process's ingress. (Serve runs a pickled copy
    of ``app``; module functions, unlike module objects, resolve to this module there.)"""
    _EDGE.update(api_key=api_key, max_body_bytes=max_body_bytes)


def edge(name: str):
    return _EDGE[name]
HEALTH_TIMEOUT_S = 5.0


class BodyLimit:
    """413 for bodies over ``app.state.max_body_bytes``, whether declared by
    Content-Length or streamed in chunks (counted as they arrive)."""

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        limit = edge("max_body_bytes") or 1 << 62
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, _too_large(int(declared), limit))
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise APIError(413, f"request body is over {limit} bytes "
                               "(http.max_body_bytes)", param="body")
            return message

        await self.inner(scope, counting_receive, send)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body is {size} bytes, more than the limit of {limit} "
                    "bytes (http.max_body_bytes)", param="body")


async def _send_error(send: Send, err: APIError) -> None:
    response = err.to_response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


app.add_middleware(BodyLimit)


@app.middleware("http")
async def _auth(request: Request, call_next):
    key = edge("api_key")
    if (key and request.url.path not in OPEN_PATHS
            and request.headers.get("authorization", "") != f"Bearer {key}"):
        return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                        type="authentication_error", code="invalid_api_key").to_response()
    return await call_next(request)


app.add_middleware(RequestMetrics)  # added last: outermost, it sees every status


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).to_response()


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.to_response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    err = from_exception(exc)
    if err.status >= 500:
        logger.exception("request failed: %s", err.message)
    return err.to_response()


def validation_error(exc: RequestValidationError) -> APIError:
    """400 naming each bad field and its value (malformed JSON included)."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}")
            continue
        if loc == [] and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the body must be a JSON object (send Content-Type: application/json)")
            continue
        where = ".".join(loc) or "body"
        param = param or where
        if err.get("type") == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        else:
            msg = err.get("msg", "").removeprefix("Value error, ")
            parts.append(f"{where}: {msg} (got {err.get('input')!r})")
    return APIError(400, "; ".join(parts) or "invalid request", param=param)


class EventStream(StreamingResponse):
    """Server-sent events that always close their iterator, whether the stream ended,
    failed or the client left: closing it cancels the replica's stream and releases
    the request's lease (an abandoned async generator would only do so when collected)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _ingress_metrics():
    """This process's ``IngressMetrics``; None (record nothing) if they cannot be built."""
    from deployments.metrics import IngressMetrics

    try:
        return IngressMetrics()
    except Exception:  # serve without metrics rather than not at all
        logger.exception("ingress metrics unavailable")
        return None


def _respond(result):
    """A body as JSON, an async iterator of SSE strings as an event stream. (Defined
    before the ingress class: Serve pickles that class when it is decorated.)"""
    if isinstance(result, dict):
        return result
    return EventStream(result, media_type="text/event-stream")


@serve.ingress(app)
class OpenAIIngress:
    """OpenAI-compatible routes over the model deployments (see module docstring)."""

    def __init__(self, app_args: dict, admission, models: dict):
        self.args = AppArgs.parse(app_args)
        set_edge(self.args.api_key(), self.args.http.max_body_bytes)
        holder = serve.get_replica_context().replica_id.unique_id
        client = AdmissionClient(admission, holder, self.args.admission.heartbeat_s,
                                 enabled=self.args.admission.enabled)
        self.service = OpenAIService(self.args, models, client)
        self.classify_service = ClassifyService(self.service)
        set_recorder(_ingress_metrics())

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when every model has a live replica reporting to admission, else 503."""
        client = self.service.admission
        if not client.enabled:
            return JSONResponse({"status": "ok"})
        try:
            snap = await asyncio.wait_for(client.handle.snapshot.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - unhealthy, and say why
            return JSONResponse({"status": "unavailable", "reason": repr(exc)}, status_code=503)
        replicas = {m.name: snap.get(m.name, {}).get("num_replicas", 0) for m in self.args.models}
        ok = all(replicas.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": replicas},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(self) -> dict:
        return await self.service.list_models()

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        return _respond(await self.service.completions(body, self._timer(request, body)))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return _respond(await self.service.chat(body, self._timer(request, body)))

    @app.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request) -> dict:
        return await self.service.embeddings(body, self._timer(request, body))

    # ---- classification (deployments/classify_api.py) ----------------------------------

    @app.post("/v1/classify")
    async def classify(self, body: ClassifyRequest, request: Request) -> dict:
        return await self.classify_service.classify(body, self._timer(request, body))

    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    @app.post("/rerank")
    async def rerank(self, body: RerankRequest, request: Request) -> dict:
        return await self.classify_service.rerank(body, self._timer(request, body))

    @app.post("/v1/score")
    @app.post("/score")
    async def score(self, body: ScoreRequest, request: Request) -> dict:
        return await self.classify_service.score(body, self._timer(request, body))

    @app.get("/v1/admission")
    async def admission(self) -> dict:
        """The controller's ledger per model (reserved, capacity, leases, waiters)."""
        client = self.service.admission
        if not client.enabled:
            return {}
        return await client.handle.snapshot.remote()

    def _timer(self, request: Request, body):
        return timer(request.scope, body.model, self.service.handles)
