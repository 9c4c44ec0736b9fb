"""Token-aware autoscaling: a Ray Serve custom autoscaling policy over the tokens the
replicas hold, against the capacity they measured.

Every replica reports ``record_autoscaling_stats`` (``deployments/replica/deployment.py``):
``used_tokens`` (the leases of the requests it is serving, running or queued in its
engine), ``capacity_tokens`` (its measured KV / step capacity) and ``num_requests``.
Serve averages each over ``look_back_period_s`` and calls ``TokenPolicy`` every control
loop tick in the Serve controller.

| quantity | value                                                                       |
|----------|-----------------------------------------------------------------------------|
| demand   | sum of used_tokens + requests queued at Serve handles x tokens per request  |
| per replica | the mean reported capacity_tokens x target_token_utilization             |
| up       | ceil(demand / per replica), as many replicas as that at once                |
| down     | one replica at a time, and only when demand fits one replica fewer with     |
|          | DOWNSCALE_HEADROOM to spare (a dead band against flapping)                  |

Serve then applies ``upscale_delay_s`` / ``downscale_delay_s`` (the decision must hold that
long) and the ``min_replicas`` / ``max_replicas`` bounds. Admission caps the leases at
the capacity, so demand saturates at 100%: under a burst every step multiplies the replicas
by at most 1 / target_token_utilization. Scale-down drains: Serve stops routing to the
replica and waits ``graceful_shutdown_timeout_s`` for its requests to finish.

Serve pickles this module by value into its controller, so it imports nothing from the
project at module level.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deployments.app.config import AutoscalingArgs

POLICY_PATH = "deployments.replica.autoscaling:TokenPolicy"
DOWNSCALE_HEADROOM = 0.8  # scale down only if demand <= 80% of the smaller fleet's target


def desired_replicas(demand_tokens: float, capacity_per_replica: float, target: float,
                     current: int, min_replicas: int, max_replicas: int) -> int:
    """Replicas for ``demand_tokens`` at ``target`` utilization of ``capacity_per_replica``
    each, moving down at most one from ``current``; within [min_replicas, max_replicas]."""
    per_replica = capacity_per_replica * target
    if per_replica <= 0:
        return max(min_replicas, min(current, max_replicas))
    wanted = math.ceil(demand_tokens / per_replica)
    if wanted > current:
        decided = wanted
    elif wanted < current and demand_tokens <= (current - 1) * per_replica * DOWNSCALE_HEADROOM:
        decided = current - 1
    else:
        decided = current
    return max(min_replicas, min(decided, max_replicas))


class TokenPolicy:
    """Serve's ``policy_function`` (a class: Serve instantiates it once with
    ``policy_kwargs`` and calls it each tick with an ``AutoscalingContext``)."""

    def __init__(self, target_token_utilization: float = 0.7):
        self.target = target_token_utilization

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        capacities = metrics.get("capacity_tokens") or {}
        current = ctx.target_num_replicas
        if not capacities:  # no replica has reported yet: hold
            return current, {}
        used = sum((metrics.get("used_tokens") or {}).values())
        num_requests = sum((metrics.get("num_requests") or {}).values())
        tokens_per_request = used / num_requests if num_requests >= 1 else 0.0
        queued = (ctx.total_queued_requests or 0.0) * tokens_per_request
        capacity = sum(capacities.values()) / len(capacities)
        decided = desired_replicas(used + queued, capacity, self.target, current,
                                   ctx.capacity_adjusted_min_replicas,
                                   ctx.capacity_adjusted_max_replicas)
        return decided, {"demand_tokens": used + queued, "capacity_per_replica": capacity}


def serve_autoscaling_config(args: AutoscalingArgs) -> dict:
    """Serve's ``autoscaling_config`` for a model's engine deployment."""
    config = {
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
        "upscale_delay_s": args.upscale_delay_s, "downscale_delay_s": args.downscale_delay_s,
        "look_back_period_s": args.look_back_period_s,
        "policy": {"policy_function": POLICY_PATH,
                   "policy_kwargs": {"target_token_utilization": args.target_token_utilization}},
    }
    if args.metrics_interval_s is not None:
        config["metrics_interval_s"] = args.metrics_interval_s
    return config
