"""The route table: every path the ingress serves, in one place.

The ingress mounts its handlers from this table (``mount``); the request metrics time
and count the paths that name an ``endpoint`` (``ENDPOINTS``); the API-key check skips
the ``open`` ones; a 404 lists the served API (``api_summary``). A new endpoint is one
row here and one handler method on ``OpenAIIngress``: it cannot be served without being
metered, or metered without being served.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    paths: tuple[str, ...]  # the first is the canonical one; the others are aliases
    method: str  # "GET" | "POST"
    handler: str  # the OpenAIIngress method that answers
    endpoint: str | None = None  # the metrics' `endpoint` label; None: not timed
    open: bool = False  # answered without the API key (health probes, the docs)


ROUTES: tuple[Route, ...] = (
    Route(("/health",), "GET", "health", open=True),
    Route(("/ping",), "GET", "ping", open=True),
    Route(("/version",), "GET", "version", open=True),
    Route(("/v1/models",), "GET", "models"),
    Route(("/v1/models/{model_id:path}",), "GET", "model"),
    Route(("/v1/completions",), "POST", "completions", "completions"),
    Route(("/v1/chat/completions",), "POST", "chat_completions", "chat"),
    Route(("/v1/responses",), "POST", "responses", "responses"),
    Route(("/v1/embeddings",), "POST", "embeddings", "embeddings"),
    Route(("/v1/classify",), "POST", "classify", "classify"),
    Route(("/v1/rerank", "/v2/rerank", "/rerank"), "POST", "rerank", "rerank"),
    Route(("/v1/score", "/score"), "POST", "score", "score"),
    Route(("/v1/tokenize", "/tokenize"), "POST", "tokenize"),
    Route(("/v1/detokenize", "/detokenize"), "POST", "detokenize"),
    Route(("/v1/admission",), "GET", "admission"),
    Route(("/v1/load_lora_adapter",), "POST", "load_lora_adapter"),
    Route(("/v1/unload_lora_adapter",), "POST", "unload_lora_adapter"),
)
DOC_PATHS = ("/docs", "/openapi.json")  # FastAPI's own pages

ENDPOINTS = {path: r.endpoint for r in ROUTES if r.endpoint for path in r.paths}
OPEN_PATHS = frozenset([*DOC_PATHS, *(p for r in ROUTES if r.open for p in r.paths)])


def api_summary() -> str:
    """The served API for error messages: ``POST /v1/completions, ...`` (canonical paths)."""
    return ", ".join(f"{r.method} {r.paths[0]}" for r in ROUTES)


def mount(app, cls) -> None:
    """Add every route to the FastAPI ``app``, answered by ``cls``'s handler methods (as
    ``@app.get``/``@app.post`` would; ``serve.ingress(app)`` then binds them to the
    replica's instance). Raises if a handler is missing: a row without a handler would
    otherwise be a route that 500s."""
    for route in ROUTES:
        handler = cls.__dict__.get(route.handler)
        if handler is None:
            raise TypeError(f"{cls.__name__} has no handler {route.handler!r} for "
                            f"{route.method} {route.paths[0]}")
        for path in route.paths:
            app.add_api_route(path, handler, methods=[route.method])
