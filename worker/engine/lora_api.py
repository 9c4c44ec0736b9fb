"""The engine's adapter API, mixed into ``Engine``: ``add_lora``, ``remove_lora`` and what
the replica reports (``loras``). The adapters themselves are ``worker.lora``'s; this file
only ties them to the engine's lock and its generation policy."""

from __future__ import annotations

import os

from worker.core.config import ConfigError, EngineConfig
from worker.lora.adapter import AdapterSpec, LoRAError, read_adapter
from worker.lora.manager import LoRAManager


def make_loras(config: EngineConfig, model, spec, wake) -> LoRAManager | None:
    """The adapter manager of an engine with ``enable_lora`` (its model wrapped, its
    ``lora_modules`` registered), or None. Generating models only."""
    if not config.enable_lora:
        return None
    if not spec.is_decoder or spec.is_classifier:
        raise ConfigError("enable_lora", f"LoRA adapters are served for causal LMs only; "
                          f"this model is {'a classifier' if spec.is_classifier else 'an encoder'}")
    manager = LoRAManager(model, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                          max_cpu_loras=config.lora_host_slots, wake=wake)
    for name, path in config.lora_modules:  # per adapter of the config
        try:
            manager.register(name, path)
        except LoRAError as exc:
            raise ConfigError("lora_modules", str(exc)) from None
    return manager


class LoRAAPI:
    """Adapter methods of ``Engine`` (which provides ``loras``, the step lock and ``_gen``)."""

    loras: LoRAManager | None = None

    def add_lora(self, name: str, path: str) -> AdapterSpec:
        """Register the PEFT adapter at ``path`` as ``name`` (checked now, read on first
        use). The same name and path again is a no-op. Raises ``LoRAError``."""
        return self._lora_manager(name).register(name, path)

    def check_lora(self, name: str, path: str) -> AdapterSpec:
        """Check the adapter at ``path`` against this model without registering it."""
        manager = self._lora_manager(name)
        return read_adapter(name, path, manager.max_lora_rank, manager.shapes)

    def ensure_lora(self, name: str, path: str) -> None:
        """``name`` registered at ``path``: a no-op when it is, registered when it is not,
        and replaced when it was registered at another path (unloaded at the edge and
        loaded again) and no request of it is unfinished."""
        manager = self._lora_manager(name)
        spec = manager.find(name)
        if spec is not None and spec.path == os.path.abspath(path):
            return
        if spec is not None:
            self.remove_lora(name)
        manager.register(name, path)

    def remove_lora(self, name: str) -> None:
        """Forget ``name``; refused (``AdapterInUseError``) while requests of it are
        unfinished."""
        manager = self._lora_manager(name)
        with self._step_lock:
            in_use = self._gen.in_use(name) if self._gen is not None else 0
            manager.unregister(name, in_use)

    def lora_state(self) -> dict:
        """What the replica reports: registered and resident adapters, loads, evictions."""
        m = self.loras
        if m is None:
            return {"registered": [], "resident": [], "max_loras": 0}
        return {"registered": m.registered, "resident": m.resident, "max_loras": m.max_loras,
                "num_loads": m.num_loads, "num_evictions": m.num_evictions,
                "grouped_mm": m.grouped}

    def _lora_manager(self, name: str) -> LoRAManager:
        if self.loras is None:
            raise LoRAError(name, "this engine serves no adapters; start it with "
                            "enable_lora", setting="enable_lora")
        return self.loras
