"""The ``http`` section's client limits, shared by the guards of every layer.

``Limits`` holds the client limits of the ``http`` section (``deployments/app/config.py``):
the ingress sets its process's with ``set_limits`` (``guards.configure``), Serve's proxy
reads them from the environment ``packserve serve`` sets (``Limits.to_env`` /
``from_env``). ``error_body`` is OpenAI's error body, the one every refusal of the guards
(``guards.py``, ``uvicorn_guard.py``) and of the drain (``draining.py``) sends. It imports
nothing from the project.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# the environment ``packserve serve`` sets for Serve's proxy (deployments/app/serve_cli.py)
ENV_PREFIX = "PACKSERVE_GUARD_"


@dataclass(frozen=True)
class Limits:
    """The ``http`` section's client limits (defaults: ``HTTPArgs``')."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    min_body_rate_bytes_s: int = 65536
    max_header_bytes: int = 16384
    max_connections: int = 4096
    max_connections_per_client: int = 256
    drain_timeout_s: float = 30.0

    @classmethod
    def of(cls, http) -> Limits:
        """From an ``HTTPArgs`` (or anything with its attributes)."""
        return cls(**{k: getattr(http, k) for k in cls.__dataclass_fields__})

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): repr(getattr(self, k))
                for k in self.__dataclass_fields__}

    @classmethod
    def from_env(cls, environ=os.environ) -> Limits | None:
        values = {}
        for name, f in cls.__dataclass_fields__.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                return None
            values[name] = (int if f.type in ("int", int) else float)(float(raw))
        return cls(**values)


_LIMITS: dict = {"limits": Limits()}  # per ingress process


def limits() -> Limits:
    """This process's limits (the defaults until ``set_limits``)."""
    return _LIMITS["limits"]


def set_limits(lim: Limits) -> None:
    _LIMITS["limits"] = lim


def error_body(status: int, message: str, *, type: str = "invalid_request_error",
               code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": None,
                                 "code": code}}).encode()
