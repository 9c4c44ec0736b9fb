"""The LoRA adapters the edge serves: which model each belongs to, how a request's
``model`` names one, and the run-time load and unload endpoints.

A request names an adapter as vLLM's clients do (``"model": "sql-lora"``) or as SGLang's
and Ray Serve LLM's do (``"model": "llama:sql-lora"``, base and adapter). The work sent to
a replica carries the adapter's name and path: a replica registers it on first use
(its engine checks it against the model and reads it off the step loop), so an adapter
loaded at run time reaches every replica without a broadcast, and a new replica needs
nothing but the requests themselves.

Adapters come from ``models[].loras`` (always served) and, when
``http.lora_runtime_updates`` is on, from ``POST /v1/load_lora_adapter``; an adapter
loaded at run time is checked by one of its model's replicas (path, config, rank,
modules, shapes) before it is listed. Unloading one that requests of this ingress still
use is a 409; a replica forgets it once idle (its slot is reused by LRU).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from deployments.app.config import AppArgs
from deployments.http.errors import APIError, bad_request, from_exception
from deployments.replica.work import Refusal

CHECK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    parent: str  # the served model's name
    path: str
    created: int
    source: str  # "config" | "runtime"


class AdapterRegistry:
    """Adapters by name (one ingress process; run-time updates need one ingress)."""

    def __init__(self, args: AppArgs, created: int):
        self.args = args
        self.runtime_updates = args.http.lora_runtime_updates
        self._by_name: dict[str, ServedAdapter] = {
            a.name: ServedAdapter(a.name, m.name, a.path, created, "config")
            for m in args.models for a in m.loras}
        self._in_flight: Counter[str] = Counter()  # requests of this ingress, by adapter
        self._lock = asyncio.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> ServedAdapter | None:
        return self._by_name.get(name)

    def of_model(self, model: str) -> list[ServedAdapter]:
        return [a for a in self._by_name.values() if a.parent == model]

    def resolve(self, name: str, served: dict) -> tuple[str, ServedAdapter | None]:
        """``(model name, adapter or None)`` that a request's ``model`` names; raises the
        404 (naming what is served) for anything else."""
        if name in served:
            return name, None
        adapter = self._by_name.get(name)
        if adapter is None and ":" in name:  # "base:adapter"
            base, _, rest = name.rpartition(":")
            candidate = self._by_name.get(rest)
            if base in served and candidate is not None and candidate.parent == base:
                adapter = candidate
        if adapter is None or adapter.parent not in served:
            names = ", ".join([*served, *self._by_name])
            raise APIError(404, f"the model {name!r} does not exist; served models and "
                           f"adapters: {names}", param="model", code="model_not_found")
        return adapter.parent, adapter

    def hold(self, name: str | None) -> None:
        """One more request of adapter ``name`` in flight (None: a base model's)."""
        if name is not None:
            self._in_flight[name] += 1

    def release(self, name: str | None) -> None:
        if name is not None:
            self._in_flight[name] -= 1
            if self._in_flight[name] <= 0:
                del self._in_flight[name]

    def entry(self, adapter: ServedAdapter) -> dict:
        """Its row of ``/v1/models`` (vLLM's shape: ``parent`` names the base model)."""
        return {"id": adapter.name, "object": "model", "created": adapter.created,
                "owned_by": "packserve", "root": adapter.path, "parent": adapter.parent,
                "packserve": {"lora": True, "source": adapter.source}}

    # ---- run-time updates ------------------------------------------------------------

    async def load(self, name, path, base: str | None, served: dict) -> ServedAdapter:
        """``POST /v1/load_lora_adapter``: check the adapter on a replica of its model,
        then serve it. 400 for a bad name, path, config or rank, or a name clash."""
        self._check_switch()
        if not isinstance(name, str) or not name:
            raise bad_request(f"lora_name must be a non-empty string, got {name!r}",
                              param="lora_name")
        if not isinstance(path, str) or not path:
            raise bad_request(f"lora_path must be a non-empty string, got {path!r}",
                              param="lora_path")
        parent = self._parent(base, served)
        async with self._lock:
            if name in served or name in self._by_name:
                what = "a served model" if name in served else "a loaded adapter"
                raise bad_request(f"the name {name!r} is taken by {what}; unload it first or "
                                  "pick another lora_name", param="lora_name")
            try:
                result = await asyncio.wait_for(
                    served[parent].handle.check_lora.remote(name, path), CHECK_TIMEOUT_S)
            except TimeoutError:
                raise APIError(503, f"no replica of {parent!r} checked the adapter within "
                               f"{CHECK_TIMEOUT_S:.0f} s", type="unavailable") from None
            except Exception as exc:  # noqa: BLE001 - mapped to what the client sees
                raise from_exception(exc) from None
            if isinstance(result, Refusal):
                raise from_exception(result.error)
            adapter = ServedAdapter(name, parent, path, int(time.time()), "runtime")
            self._by_name[name] = adapter
            return adapter

    async def unload(self, name) -> ServedAdapter:
        """``POST /v1/unload_lora_adapter``: 404 for an unknown name, 400 for one declared
        in the config, 409 while requests of this ingress use it."""
        self._check_switch()
        async with self._lock:
            adapter = self._by_name.get(name) if isinstance(name, str) else None
            if adapter is None:
                raise APIError(404, f"no LoRA adapter named {name!r} is loaded; loaded: "
                               f"{', '.join(self._by_name) or 'none'}", param="lora_name",
                               code="model_not_found")
            if adapter.source == "config":
                raise bad_request(f"the adapter {name!r} is declared in models[].loras; "
                                  "remove it there and redeploy", param="lora_name")
            busy = self._in_flight.get(name, 0)
            if busy:
                raise APIError(409, f"the adapter {name!r} is in use by {busy} running "
                               "requests; unload it once they finish", param="lora_name",
                               code="adapter_in_use")
            del self._by_name[name]
            return adapter

    def _check_switch(self) -> None:
        if not self.runtime_updates:
            raise APIError(403, "loading and unloading LoRA adapters at run time is off; "
                           "set http.lora_runtime_updates: true (or packserve serve "
                           "--lora-runtime-updates)", type="permission_error",
                           param="lora_runtime_updates")

    def _parent(self, base: str | None, served: dict) -> str:
        lora_models = [m.name for m in self.args.models
                       if m.name in served and m.engine_config().enable_lora]
        if base is not None:
            if base not in lora_models:
                raise bad_request(f"base_model_name {base!r} is not a served model with "
                                  f"enable_lora; those are: {', '.join(lora_models) or 'none'}",
                                  param="base_model_name")
            return base
        if len(lora_models) != 1:
            raise bad_request("base_model_name is required: the served models with "
                              f"enable_lora are {', '.join(lora_models) or 'none'}",
                              param="base_model_name")
        return lora_models[0]
