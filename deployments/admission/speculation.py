"""Speculation by cluster load: a model's replicas stop speculating while its pool is
nearly full, and start again once it has emptied well below that.

Speculative decoding buys latency with compute: each step verifies k proposed tokens
per sequence, and the rejected ones are work thrown away. Each engine already lowers k
as its own batch fills (``SpeculativeConfig``'s load rule); this rule sees the whole
model: when the tokens leased over the replicas' capacity (the admission pool's
utilization, as ``AdmissionLedger.pool_tokens`` counts it: a replica under KV pressure
offers no room past what it holds) reaches ``off_utilization``, requests are about to
queue or be refused, and every token of compute should go to accepted output, so
speculation is switched off on every replica of the model; it is switched on again when
utilization falls below ``on_utilization``. Two thresholds, not one, so a pool hovering
around one value does not flip the replicas each heartbeat.

| utilization u (reserved / capacity)  | speculation: off before | on before |
|--------------------------------------|-------------------------|-----------|
| u >= off_utilization                 | off                     | off       |
| on_utilization <= u < off_utilization| off                     | on        |
| u < on_utilization                   | on                      | on        |
| no capacity (no replica reported)    | unchanged               | unchanged |

The controller applies it at each replica report and answers the report with the cap
(``speculation_cap``): the replica hands it to ``Engine.set_speculation_cap`` when it
changed, so the switch rides the heartbeat and costs no call of its own. Pure (no Ray,
no clock), so the rule is unit-tested directly.
"""

from __future__ import annotations


class SpeculationSwitch:
    """Per model: whether its replicas may speculate (the module docstring's rule)."""

    def __init__(self, off_utilization: float = 0.85, on_utilization: float = 0.6):
        if not 0 <= on_utilization < off_utilization:
            raise ValueError(f"on_utilization ({on_utilization}) must be >= 0 and < "
                             f"off_utilization ({off_utilization})")
        self.off_utilization, self.on_utilization = off_utilization, on_utilization
        self._off: set[str] = set()  # models whose replicas are told not to speculate

    def update(self, model: str, reserved: int, capacity: int) -> bool:
        """Apply the rule to ``model``'s pool now; True when its switch flipped."""
        if capacity <= 0:
            return False
        utilization = reserved / capacity
        if model in self._off:
            if utilization < self.on_utilization:
                self._off.discard(model)
                return True
        elif utilization >= self.off_utilization:
            self._off.add(model)
            return True
        return False

    def is_on(self, model: str) -> bool:
        return model not in self._off

    def speculation_cap(self, model: str) -> int | None:
        """What ``model``'s replicas pass to ``Engine.set_speculation_cap``: 0 (off) or
        None (no cap: each engine's own load rule decides k)."""
        return 0 if model in self._off else None
