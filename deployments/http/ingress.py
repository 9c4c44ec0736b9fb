"""The HTTP edge: a FastAPI app served by Ray Serve (``@serve.ingress``).

Framing only: routes, API-key auth, the body (read whole, bounded, valid UTF-8), every
error rendered in OpenAI's format (``deployments/http/errors.py``; FastAPI's own 404, 405
and body errors included) and logged as one WARNING line, and per-request metrics
(``deployments/http/request_timer.py``, the outermost middleware, so that 401s, 413s and
invalid bodies are counted too). The endpoints' logic lives in
``deployments/http/openai_api.py``. The middlewares are plain ASGI (no
``BaseHTTPMiddleware``, which copies every streamed chunk through a memory stream).
"""

import asyncio
import logging
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.http.classify_api import ClassifyService
from deployments.http.classify_protocol import ClassifyRequest, RerankRequest, ScoreRequest
from deployments.app.config import AppArgs
from deployments.http.errors import APIError, from_exception
from deployments.http import guards
from deployments.admission.leases import AdmissionClient
from deployments.http.openai_api import OpenAIService
from deployments.http.protocol import (
    FIELD_ERROR,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
    ignored_header,
    short,
)
from deployments.http.request_timer import ClientLeft, RequestMetrics, set_recorder, timer
from deployments.http.responses_api import create as create_response
from deployments.http.responses_protocol import ResponsesRequest
from deployments.http.routes import OPEN_PATHS, api_summary, mount

logger = logging.getLogger("ray.serve")

app = FastAPI(title="packserve", description="OpenAI-compatible, padding-free LLM serving")
BODY_METHODS = ("POST", "PUT", "PATCH")
_EDGE: dict = {"api_key": None, "max_body_bytes": None, "served": frozenset()}  # per process
HEALTH_TIMEOUT_S = 5.0


def _package_version() -> str:
    try:
        return metadata.version("packserve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


VERSION = _package_version()


def set_edge(api_key: str | None, max_body_bytes: int, served=()) -> None:
    """The auth key, body limit and served model names of this process's ingress. (Serve
    runs a pickled copy of ``app``; module functions, unlike module objects, resolve to
    this module there.)"""
    _EDGE.update(api_key=api_key, max_body_bytes=max_body_bytes, served=frozenset(served))


def edge(name: str):
    return _EDGE[name]


def log_client_error(scope: Scope, err: APIError) -> None:
    """One WARNING line per 4xx (not 429s: overload is counted, not logged per request)."""
    if 400 <= err.status < 500 and err.status != 429:
        logger.warning("%s %s -> %d: %s", scope.get("method"), scope.get("path"),
                       err.status, err.message)


async def _send_error(scope: Scope, send: Send, err: APIError) -> None:
    log_client_error(scope, err)
    response = err.to_response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class BodyReader:
    """Reads a request's body whole before routing: 413 past ``http.max_body_bytes``
    whether declared by Content-Length or streamed in chunks (counted as they arrive),
    400 if it is not UTF-8; then replays it to the app."""

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.inner(scope, receive, send)
        limit = edge("max_body_bytes") or 1 << 62
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(scope, send, _too_large(f"is {int(declared)} bytes", limit))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _send_error(scope, send, _too_large(f"is over {limit} bytes "
                                                                 "(sent in chunks)", limit))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await _send_error(scope, send, APIError(
                400, f"the body is not valid UTF-8: byte 0x{body[exc.start]:02x} at position "
                f"{exc.start} ({exc.reason}); JSON bodies must be UTF-8", param="body"))
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:  # later reads wait for the client to leave (streams listen)
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.inner(scope, replay, send)


def _too_large(what: str, limit: int) -> APIError:
    return APIError(413, f"the request body {what}, more than the limit of {limit} bytes "
                    "(http.max_body_bytes)", param="body")


class Auth:
    """401 without ``Authorization: Bearer <http.api_key>`` (when a key is set)."""

    def __init__(self, inner: ASGIApp):
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = edge("api_key")
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if key and scope["type"] == "http" and path not in OPEN_PATHS:
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if given != f"Bearer {key}".encode():
                return await _send_error(scope, send, APIError(
                    401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error", code="invalid_api_key"))
        await self.inner(scope, receive, send)


app.add_middleware(BodyReader)
app.add_middleware(Auth)
app.add_middleware(guards.Guard)  # 431, 408, in-flight count and drain (guards.py)
app.add_middleware(RequestMetrics)  # added last: outermost, it sees every status


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the field; counted under the body's model when it names a served one
    (a refused ``stop`` is the client's error on that model, not an unknown model's)."""
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        timer(request.scope, body["model"], edge("served"))
    return _logged(request, validation_error(exc))


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _logged(request, exc)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown path, wrong method, unreadable body) in OpenAI's body."""
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        err = APIError(404, f"no route {method} {path}: the API is {api_summary()}",
                       code="not_found")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        err = APIError(405, f"{method} is not allowed on {path}; allowed: {allowed}",
                       code="method_not_allowed")
    else:
        err = APIError(exc.status_code, f"{exc.detail}")
    response = _logged(request, err)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    err = from_exception(exc)
    if err.status >= 500:
        logger.exception("request failed: %s", err.message)
    return _logged(request, err)


def _logged(request: Request, err: APIError) -> JSONResponse:
    log_client_error(request.scope, err)
    return err.to_response()


def validation_error(exc: RequestValidationError) -> APIError:
    """400 naming each bad field and its value (malformed JSON included)."""
    parts, param = [], None
    for err in exc.errors():
        loc = [p for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}")
            continue
        if loc == [] and kind in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("the body must be a JSON object (send Content-Type: application/json)")
            continue
        if kind == FIELD_ERROR:
            where, msg = err["ctx"]["field"], err["ctx"]["message"]
        else:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
            where = where.lstrip(".") or "body"
            msg = err.get("msg", "").removeprefix("Value error, ")
            msg = "unknown field" if kind == "extra_forbidden" else (
                f"{msg} (got {short(err.get('input'))})")
        param = param or where
        parts.append(f"{where}: {msg}")
    return APIError(400, "; ".join(parts) or "invalid request", param=param)


class EventStream(StreamingResponse):
    """Server-sent events that always close their iterator, whether the stream ended,
    failed or the client left: closing it cancels the replica's call and releases the
    request's lease (an abandoned async generator would only do so when collected)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _ingress_metrics():
    """This process's ``IngressMetrics``; None (record nothing) if they cannot be built."""
    from deployments.app.metrics import IngressMetrics

    try:
        return IngressMetrics()
    except Exception:  # serve without metrics rather than not at all
        logger.exception("ingress metrics unavailable")
        return None


def _respond(result, body=None):
    """A dict as JSON, bytes as a JSON body, an async iterator of SSE strings as an
    event stream; with the header naming ``body``'s ignored fields, if any (protocol.py).
    (Defined before the ingress class: Serve pickles that class.)"""
    headers = ignored_header(body)
    if isinstance(result, dict):
        return JSONResponse(jsonable_encoder(result), headers=headers) if headers else result
    if isinstance(result, bytes):
        return Response(result, media_type="application/json", headers=headers)
    return EventStream(result, media_type="text/event-stream", headers=headers)


class OpenAIIngress:
    """OpenAI-compatible routes over the model deployments (see module docstring). Each
    handler answers the row of ``deployments/http/routes.py`` that names it."""

    async def __init__(self, app_args: dict, admission, models: dict):
        self.args = AppArgs.parse(app_args)
        set_edge(self.args.api_key(), self.args.http.max_body_bytes,
                 [m.name for m in self.args.models])
        guards.configure(self.args.http)  # client limits, drain watcher
        holder = serve.get_replica_context().replica_id.unique_id
        client = AdmissionClient(admission, holder, self.args.admission.heartbeat_s,
                                 enabled=self.args.admission.enabled,
                                 batch=self.args.admission.max_wait_s == 0,
                                 retry_after_s=(self.args.admission.retry_after_min_s,
                                                self.args.admission.retry_after_max_s))
        metrics = _ingress_metrics()
        set_recorder(metrics)
        self.service = OpenAIService(self.args, models, client, metrics)
        self.classify_service = ClassifyService(self.service)
        self._warm_up = asyncio.get_running_loop().create_task(self.service.warm_up())

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

    async def ping(self) -> Response:
        """200 while this ingress process answers (liveness; ``/health`` is readiness)."""
        return Response(status_code=200)

    async def version(self) -> dict:
        return {"version": VERSION}

    async def models(self) -> dict:
        return await self.service.list_models()

    async def model(self, model_id: str) -> dict:
        """One entry of ``/v1/models``; 404 naming the served models otherwise."""
        return await self.service.model_entry(model_id)

    async def completions(self, body: CompletionRequest, request: Request):
        return _respond(await self.service.completions(body, self._timer(request, body)), body)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        return _respond(await self.service.chat(body, self._timer(request, body)), body)

    async def responses(self, body: ResponsesRequest, request: Request):
        """OpenAI's Responses API, stateless, on the chat path (responses_api.py)."""
        return _respond(await create_response(self.service, body, self._timer(request, body)))

    async def embeddings(self, body: EmbeddingRequest, request: Request):
        return _respond(await self.service.embeddings(body, self._timer(request, body)), body)

    # ---- classification (deployments/http/classify_api.py) ----------------------------------

    async def classify(self, body: ClassifyRequest, request: Request) -> dict:
        return await self.classify_service.classify(body, self._timer(request, body))

    async def rerank(self, body: RerankRequest, request: Request) -> dict:
        return await self.classify_service.rerank(body, self._timer(request, body))

    async def score(self, body: ScoreRequest, request: Request) -> dict:
        return await self.classify_service.score(body, self._timer(request, body))

    async def tokenize(self, body: TokenizeRequest):
        return _respond(await self.service.tokenize(body), body)

    async def detokenize(self, body: DetokenizeRequest):
        return _respond(await self.service.detokenize(body), body)

    async def load_lora_adapter(self, body: LoadLoRARequest) -> dict:
        """vLLM's run-time adapter load (``http.lora_runtime_updates``; else 403)."""
        return await self.service.load_lora(body)

    async def unload_lora_adapter(self, body: UnloadLoRARequest) -> dict:
        return await self.service.unload_lora(body)

    async def admission(self) -> dict:
        """The controller's ledger per model (reserved, capacity, leases, waiters)."""
        client = self.service.admission
        if not client.enabled:
            return {}
        return await client.handle.snapshot.remote()

    async def state(self) -> dict:
        """This ingress process, for tests and operators (a handle call, not a route)."""
        return self.service.state()

    def _timer(self, request: Request, body):
        try:  # an adapter's requests are timed under its base model
            model, adapter = self.service.loras.resolve(body.model, self.service.served)
        except APIError:
            model, adapter = body.model, None
        return timer(request.scope, model, self.service.served,
                     adapter.name if adapter is not None else None)


mount(app, OpenAIIngress)
OpenAIIngress = serve.ingress(app)(OpenAIIngress)
