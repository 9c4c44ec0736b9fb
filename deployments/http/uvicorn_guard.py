"""Slow and hostile clients at uvicorn (the limits: ``deployments/http/client_limits.py``).

``install_uvicorn_guards``: what ASGI cannot see, because uvicorn (Serve's proxy and
the replicas' direct-ingress servers) only calls the app once the headers are complete
and has no header deadline, no header size limit with httptools, and no connection
caps. It replaces ``uvicorn.protocols.http.auto.AutoHTTPProtocol`` (what uvicorn's
default ``http="auto"`` loads when a server starts) by a subclass that arms a header
deadline on each connection and request (408 in OpenAI's body, then close), counts
header bytes (431), and caps connections per client address and in all (429 / 503).
Serve's proxy installs it through Ray's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(``proxy_callback``, set by ``packserve serve``, the limits in the environment:
``Limits.to_env``); an ingress replica installs it when it starts (its direct-ingress
server, throughput mode, starts after the ingress is built).
"""

from __future__ import annotations

import logging

from deployments.http.client_limits import Limits, error_body

logger = logging.getLogger("ray.serve")

# ---- uvicorn: the header deadline, header bytes, connection caps -------------------

def _raw_response(status: int, reason: str, body: bytes, retry_after: int | None = None) -> bytes:
    extra = f"retry-after: {retry_after}\r\n" if retry_after else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n").encode() + body


def guarded_protocol(base: type, lim: Limits) -> type:
    """A subclass of uvicorn's HTTP protocol class with the limits of ``lim``."""

    class GuardedHTTPProtocol(base):
        packserve_limits = lim
        per_client: dict = {}

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._ps_timer = None
            self._ps_header_bytes = 0
            self._ps_tail = b""
            self._ps_ip = self.client[0] if self.client else None
            counts = type(self).per_client
            counts[self._ps_ip] = counts.get(self._ps_ip, 0) + 1
            if counts[self._ps_ip] > lim.max_connections_per_client:
                return self._ps_refuse(429, "Too Many Requests", error_body(
                    429, f"more than {lim.max_connections_per_client} connections from your "
                    "address (http.max_connections_per_client)", type="rate_limit_error",
                    code="too_many_connections"))
            if len(self.connections) > lim.max_connections:
                return self._ps_refuse(503, "Service Unavailable", error_body(
                    503, f"the server holds its limit of {lim.max_connections} connections "
                    "(http.max_connections); retry", type="service_unavailable"), 1)
            self._ps_arm()

        def connection_lost(self, exc) -> None:
            self._ps_disarm()
            counts = type(self).per_client
            left = counts.get(self._ps_ip, 1) - 1
            if left > 0:
                counts[self._ps_ip] = left
            else:
                counts.pop(self._ps_ip, None)
            super().connection_lost(exc)

        def _ps_refuse(self, status: int, reason: str, body: bytes, retry=None) -> None:
            if not self.transport.is_closing():
                self.transport.write(_raw_response(status, reason, body, retry))
                self.transport.close()

        def _ps_arm(self) -> None:
            if self._ps_timer is None:
                self._ps_header_bytes, self._ps_tail = 0, b""
                self._ps_timer = self.loop.call_later(lim.header_timeout_s, self._ps_expired)

        def _ps_disarm(self) -> None:
            if getattr(self, "_ps_timer", None) is not None:
                self._ps_timer.cancel()
                self._ps_timer = None

        def _ps_expired(self) -> None:
            self._ps_timer = None
            if self._ps_awaiting_headers():
                self._ps_refuse(408, "Request Timeout", error_body(
                    408, f"the request headers did not arrive within "
                    f"{lim.header_timeout_s:g} s (http.header_timeout_s)",
                    code="request_timeout"))

        def _ps_awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            awaiting = self._ps_awaiting_headers()
            if awaiting:
                self._ps_arm()
                seen = self._ps_tail + data
                end = seen.find(b"\r\n\r\n")
                counted = len(data) if end < 0 else max(0, end + 4 - len(self._ps_tail))
                self._ps_header_bytes += counted
                self._ps_tail = seen[-3:]
                if self._ps_header_bytes > lim.max_header_bytes:
                    self._ps_disarm()
                    return self._ps_refuse(431, "Request Header Fields Too Large", error_body(
                        431, f"the request headers are more than {lim.max_header_bytes} "
                        "bytes (http.max_header_bytes)",
                        code="request_header_fields_too_large"))
            super().data_received(data)
            if awaiting and self.cycle is not before:  # the headers are complete
                self._ps_disarm()

    GuardedHTTPProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedHTTPProtocol


def install_uvicorn_guards(lim: Limits) -> bool:
    """Make uvicorn's default HTTP protocol the guarded one (idempotent; the latest limits
    win). False if this uvicorn does not have the expected shape (nothing is changed)."""
    try:
        from uvicorn.protocols.http import auto

        base = getattr(auto.AutoHTTPProtocol, "packserve_base", auto.AutoHTTPProtocol)
        for name in ("connection_made", "connection_lost", "data_received"):
            getattr(base, name)
        guarded = guarded_protocol(base, lim)
        guarded.packserve_base = base
        auto.AutoHTTPProtocol = guarded
        return True
    except Exception:  # noqa: BLE001
        logger.warning("uvicorn guards not installed (unexpected uvicorn)", exc_info=True)
        return False


def proxy_callback() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: run in Serve's proxy actor before
    its uvicorn starts; installs the guards with the limits ``packserve serve`` put in the
    environment. Returns no middleware."""
    lim = Limits.from_env()
    if lim is not None:
        install_uvicorn_guards(lim)
    return []
