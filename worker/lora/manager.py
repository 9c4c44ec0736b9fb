"""Which adapters an engine knows, which are resident in its ``max_loras`` slots, and the
loads in between.

Three tiers, as vLLM and S-LoRA keep them:

| tier       | holds                                              | bound            |
|------------|----------------------------------------------------|------------------|
| registered | name -> ``AdapterSpec`` (checked, weights unread)  | none (names)     |
| host       | prepared tensors, read from disk by the loader     | ``max_cpu_loras``, LRU |
| slots      | the wrapped layers' slot buffers (on the device)   | ``max_loras``    |

A sequence of an adapter is admitted only once its adapter holds a slot; it pins the slot
while it runs (``acquire`` / ``release``), so a step never has more than ``max_loras``
adapters and a running adapter is never evicted. A slot goes to the least recently used
unpinned adapter when all are taken. Reading an adapter from disk happens on the loader
thread: the step loop only copies prepared tensors into a slot (``poll``), so a load
never blocks a step, and a sequence whose adapter is loading waits while others run.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from worker.lora.adapter import PREFIX, TARGETS, AdapterSpec, LoRAError, read_adapter
from worker.lora.layers import LoRALinear, check_grouped_mm
from worker.quant.fp8 import Fp8Linear

logger = logging.getLogger(__name__)

Prepared = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A^T [in, r], s B^T [r, out])


class AdapterInUseError(LoRAError):
    """Unloading an adapter that running or queued requests use."""


def wrap_model(model: nn.Module, max_loras: int, max_rank: int) -> dict[str, LoRALinear]:
    """Wrap every linear layer an adapter may target (``TARGETS``) in place; returns them
    by module path. The rank is padded up to a multiple of 16 (grouped_mm's row strides
    must be multiples of 16 bytes)."""
    rank = -(-max_rank // 16) * 16
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear | Fp8Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    wrapped = {}
    for name, module in found:  # per targeted linear (7 per layer, the head)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module, max_loras, rank, head=leaf == "lm_head")
        setattr(parent, leaf, layer)
        wrapped[name] = layer
    return wrapped


class LoRAManager:
    """Adapters of one engine (see the module docstring). Every method but ``register``,
    ``unregister`` and the loader's own work runs on the step thread."""

    def __init__(self, model: nn.Module, *, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, wake: Callable[[], None] | None = None):
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.layers = wrap_model(model, max_loras, max_lora_rank)
        if not self.layers:
            raise LoRAError("*", "the model has no linear layer an adapter may target "
                            f"({', '.join(TARGETS)})", setting="max_loras")
        first = next(iter(self.layers.values()))
        self.device, self.dtype = first.a.device, first.a.dtype
        self.grouped = check_grouped_mm(first)
        self.shapes = {n: (m.in_features, m.out_features) for n, m in self.layers.items()}
        self.wake = wake
        self._lock = threading.Lock()  # registered, host and the loads' futures
        self._registered: dict[str, AdapterSpec] = {}
        self._serials: dict[str, int] = {}  # name -> its registration's number (cache salt)
        self._next_serial = 0
        self._host: OrderedDict[str, Prepared] = OrderedDict()  # LRU, newest last
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, BaseException] = {}  # loads that failed, until taken
        self._slots: list[str | None] = [None] * max_loras  # slot -> adapter
        self._slot_of: dict[str, int] = {}
        self._pins = [0] * max_loras  # running sequences per slot
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident adapters, newest last
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="packserve-lora-load")
        self.num_loads = 0  # slot installs so far (reloads included)
        self.num_evictions = 0

    # ---- registry (any thread) -----------------------------------------------------

    def register(self, name: str, path: str) -> AdapterSpec:
        """Check and register ``name``; the same name and path again is a no-op, another
        path under a registered name is a ``LoRAError``."""
        if not isinstance(name, str) or not name:
            raise LoRAError(str(name), "the adapter needs a non-empty name", setting="lora_name")
        spec = read_adapter(name, path, self.max_lora_rank, self.shapes)
        with self._lock:
            old = self._registered.get(name)
            if old is not None and old.path != spec.path:
                raise LoRAError(name, f"the name is taken by the adapter at {old.path!r}",
                                value=name, setting="lora_name")
            if old is None:
                self._next_serial += 1
                self._serials[name] = self._next_serial
            self._registered[name] = spec
        return spec

    def salt(self, name: str) -> str:
        """What salts the prefix cache for ``name``: its name and registration (an
        adapter unloaded and loaded again, maybe changed on disk, shares no KV)."""
        return f"{name}#{self._serials.get(name, 0)}"

    def unregister(self, name: str, in_use: int) -> None:
        """Forget ``name`` (its slot and host copy go); ``in_use``: the engine's count of
        unfinished requests of it, refused when above 0."""
        with self._lock:
            if name not in self._registered:
                raise LoRAError(name, "no adapter of that name is loaded", value=name,
                                setting="lora_name")
            if in_use:
                raise AdapterInUseError(name, f"{in_use} unfinished requests use it; "
                                        "unload it once they finish", value=in_use,
                                        setting="lora_name")
            del self._registered[name]
            self._serials.pop(name, None)
            self._host.pop(name, None)
        slot = self._slot_of.pop(name, None)  # step thread (the engine holds the step lock)
        if slot is not None:
            self._slots[slot] = None
            self._lru.pop(name, None)
            for layer in self.layers.values():  # per wrapped layer
                layer.set_slot(slot, None, None)

    def find(self, name: str) -> AdapterSpec | None:
        with self._lock:
            return self._registered.get(name)

    def spec(self, name: str) -> AdapterSpec:
        with self._lock:
            spec = self._registered.get(name)
        if spec is None:
            raise LoRAError(name, "no adapter of that name is loaded", value=name,
                            setting="model")
        return spec

    @property
    def registered(self) -> list[str]:
        with self._lock:
            return sorted(self._registered)

    @property
    def resident(self) -> list[str]:
        """Adapters in slots now (what the router prefers this replica for)."""
        return [s for s in self._slots if s is not None]

    # ---- slots (step thread) -------------------------------------------------------

    def acquire(self, name: str) -> int | None:
        """The slot of ``name`` pinned for one more sequence, or None when it is not
        resident yet (its load is started: the sequence waits)."""
        slot = self._slot_of.get(name)
        if slot is None:
            self._start_load(name)
            return None
        self._pins[slot] += 1
        self._lru.move_to_end(name)
        return slot

    def release(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] < 0:
            raise AssertionError(f"LoRA slot {slot} released more often than acquired")

    def poll(self) -> None:
        """Install loads that finished into free (or least recently used unpinned)
        slots. A load that finds every slot pinned stays pending (``has_news``) and is
        installed at a later step, once a running sequence of another adapter ends."""
        with self._lock:
            done = [n for n, f in self._loading.items() if f.done()]
        for name in done:  # per load that finished and is not installed yet
            future = self._loading[name]
            error = future.exception()
            if error is not None:
                del self._loading[name]
                self._failed[name] = error
            elif self._install(name, future.result()):
                del self._loading[name]

    def take_failed(self) -> dict[str, BaseException]:
        """Adapters whose load failed since the last call (their waiting sequences fail)."""
        failed, self._failed = self._failed, {}
        return failed

    @property
    def has_news(self) -> bool:
        """A load finished (``poll`` has work)."""
        with self._lock:
            return any(f.done() for f in self._loading.values())

    @property
    def has_failed(self) -> bool:
        """A load failed and its waiting sequences are not failed yet."""
        return bool(self._failed)

    @property
    def num_pinned(self) -> int:
        return sum(1 for p in self._pins if p)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- helpers --------------------------------------------------------------------

    def _start_load(self, name: str) -> None:
        with self._lock:
            if name in self._loading:
                return
            spec = self._registered.get(name)
            if spec is None:
                self._failed[name] = LoRAError(name, "was unloaded while requests waited "
                                               "for it", setting="model")
                return
            prepared = self._host.get(name)
            if prepared is not None:  # in host memory: no disk read
                self._host.move_to_end(name)
                future: Future = Future()
                future.set_result(prepared)
            else:
                future = self._pool.submit(self._read, spec)
                if self.wake is not None:
                    future.add_done_callback(lambda _: self.wake())
            self._loading[name] = future

    def _read(self, spec: AdapterSpec) -> Prepared:
        """On the loader thread: the adapter's tensors, transposed, scaled, in the
        model's dtype (host memory), kept in the host tier."""
        from safetensors.torch import load_file

        tensors = load_file(spec.weights_path, device="cpu")
        prepared: Prepared = {}
        for m in spec.modules:  # per targeted module
            base = PREFIX + m.module
            a = _one(tensors, base, "A", spec.name)
            b = _one(tensors, base, "B", spec.name)
            prepared[m.module] = (a.t().to(self.dtype).contiguous(),
                                  (b.float() * m.scaling).t().to(self.dtype).contiguous())
        with self._lock:
            if spec.name in self._registered:
                self._host[spec.name] = prepared
                while len(self._host) > self.max_cpu_loras:
                    self._host.popitem(last=False)
        return prepared

    def _install(self, name: str, prepared: Prepared) -> bool:
        """Whether ``name`` is in a slot now (or was unloaded meanwhile: nothing to do)."""
        if name not in self._registered:
            return True
        slot = self._free_slot()
        if slot is None:  # every slot pinned: try again when one is released
            return False
        old = self._slots[slot]
        if old is not None:
            del self._slot_of[old]
            self._lru.pop(old, None)
            self.num_evictions += 1
        for module, layer in self.layers.items():  # per wrapped layer
            a_t, b_t = prepared.get(module, (None, None))
            layer.set_slot(slot, a_t, b_t)
        self._slots[slot], self._slot_of[name] = name, slot
        self._lru[name] = None
        self.num_loads += 1
        logger.info("LoRA adapter %r in slot %d (%d loads, %d evictions)", name, slot,
                    self.num_loads, self.num_evictions)
        return True

    def _free_slot(self) -> int | None:
        for slot, held in enumerate(self._slots):  # per slot: an empty one first
            if held is None:
                return slot
        for name in self._lru:  # least recently used first
            slot = self._slot_of[name]
            if not self._pins[slot]:
                return slot
        return None


def _one(tensors: dict, base: str, ab: str, name: str) -> torch.Tensor:
    for key in (f"{base}.lora_{ab}.weight", f"{base}.lora_{ab}.default.weight"):
        if key in tensors:
            return tensors[key]
    raise LoRAError(name, f"{base}.lora_{ab}.weight is missing")
