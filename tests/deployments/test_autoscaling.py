"""Token-aware autoscaling: the policy's arithmetic, the policy under Serve's own wrapper
(delays and bounds), the config, and a real run on the test cluster's fake GPUs: a burst
scales up, idle scales back to min, and no accepted request is lost while replicas drain.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from deployments.replica.autoscaling import TokenPolicy, desired_replicas, serve_autoscaling_config
from deployments.app.config import AppArgs, AppConfigError, AutoscalingArgs
from tests.deployments.openai_load import Load

GEN = "autoscale-smoke"
CAPACITY = 64 * 16  # num_kv_blocks x kv_block_size: each replica's measured capacity
ARGS = {
    "models": [{
        "name": GEN, "model": "smoke:decoder", "num_gpus": 1,  # one fake GPU per replica
        "engine": {"device": "cpu", "max_num_batched_tokens": 512, "num_kv_blocks": 64,
                   "max_model_len": 512},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_token_utilization": 0.5,
                        "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2,
                        "metrics_interval_s": 0.5},
    }],
    "admission": {"heartbeat_s": 0.5, "replica_timeout_s": 3},
}


# ---- the arithmetic -----------------------------------------------------------------

@pytest.mark.parametrize("demand, current, expected", [
    (0, 1, 1),  # idle at min
    (1024, 1, 2),  # full at 50% target: two
    (3000, 1, 3),  # far over: straight up, to max
    (100_000, 2, 3),  # capped at max
    (0, 3, 2),  # idle: down one step only
    (400, 2, 1),  # fits one replica with headroom (<= 0.8 x 512)
    (450, 2, 2),  # would fit one replica, but not with headroom: hold (dead band)
    (600, 2, 2),  # needs two
])
def test_desired_replicas(demand, current, expected):
    assert desired_replicas(demand, CAPACITY, 0.5, current, 1, 3) == expected


def context(used: dict, capacity: dict, requests: dict, current: int, queued: float = 0.0):
    return SimpleNamespace(
        aggregated_metrics={"used_tokens": used, "capacity_tokens": capacity,
                            "num_requests": requests},
        target_num_replicas=current, total_queued_requests=queued,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4)


def test_policy_counts_held_and_queued_tokens():
    policy = TokenPolicy(target_token_utilization=0.5)
    ctx = context({"a": 512}, {"a": CAPACITY}, {"a": 2}, current=1)
    assert policy(ctx)[0] == 1  # 512 tokens held: 50%, on target
    ctx = context({"a": 512}, {"a": CAPACITY}, {"a": 2}, current=1, queued=4)
    decided, state = policy(ctx)  # + 4 queued requests x 256 tokens each
    assert decided == 3 and state["demand_tokens"] == 512 + 4 * 256


def test_policy_holds_until_a_replica_reports():
    ctx = SimpleNamespace(aggregated_metrics={}, target_num_replicas=2, total_queued_requests=0,
                          capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4)
    assert TokenPolicy()(ctx) == (2, {})


def test_policy_under_serves_wrapper_applies_the_delays():
    """Serve wraps a custom policy with upscale/downscale delays and bounds; ours returns
    the raw decision and lets the wrapper time it."""
    from ray.serve._private.autoscaling_state import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    args = AutoscalingArgs(min_replicas=1, max_replicas=3, target_token_utilization=0.5,
                           upscale_delay_s=0, downscale_delay_s=3600)
    config = AutoscalingConfig(**serve_autoscaling_config(args))
    policy = _apply_autoscaling_config(config.policy.get_policy()(**config.policy.policy_kwargs))

    def ctx(used: int, current: int, state: dict):
        return AutoscalingContext(
            deployment_id=None, deployment_name="engine", app_name="packserve",
            current_num_replicas=current, target_num_replicas=current, running_replicas=[],
            total_num_requests=1, total_queued_requests=0,
            aggregated_metrics={"used_tokens": {"r": used}, "capacity_tokens": {"r": CAPACITY},
                                "num_requests": {"r": 1}},
            raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3,
            policy_state=state, last_scale_up_time=None, last_scale_down_time=None,
            current_time=time.time(), config=config)

    up, state = policy(ctx(CAPACITY, 1, {}))
    assert up == 2  # no upscale delay
    down, _ = policy(ctx(0, 2, state))
    assert down == 2  # an hour of downscale delay: not yet


def test_config_rejects_num_replicas_with_autoscaling_and_bad_bounds():
    model = dict(ARGS["models"][0], num_replicas=2)
    with pytest.raises(AppConfigError, match=r"models\[0\]: num_replicas \(2\) and autoscaling"):
        AppArgs.parse({"models": [model]})
    model = dict(ARGS["models"][0], autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(AppConfigError, match=r"min_replicas \(3\) must be <= max_replicas \(2\)"):
        AppArgs.parse({"models": [model]})
    model = dict(ARGS["models"][0], autoscaling={"max_replicas": 2, "target_utilization": 1})
    with pytest.raises(AppConfigError, match=r"autoscaling\.target_utilization: unknown key"):
        AppArgs.parse({"models": [model]})


def test_builder_passes_the_token_policy_to_serve():
    from deployments.app.builder import engine_deployment

    app = AppArgs.parse(ARGS)
    config = engine_deployment(app.models[0], app.router)._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (1, 3)
    assert config.policy.policy_function == "deployments.replica.autoscaling:TokenPolicy"
    assert config.policy.policy_kwargs == {"target_token_utilization": 0.5}
    assert (config.upscale_delay_s, config.downscale_delay_s) == (1, 4)


# ---- a real run -----------------------------------------------------------------------

def running_replicas() -> int:
    from ray import serve

    from deployments.app.builder import deployment_name
    from tests.deployments.conftest import APP

    app = serve.status().applications.get(APP)
    if app is None or deployment_name(GEN) not in app.deployments:
        return 0
    return app.deployments[deployment_name(GEN)].replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        value = predicate()
        seen.append(value)
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {seen[-5:]})")


def test_burst_scales_up_idle_scales_down_and_nothing_is_lost(serve_url):
    from tests.deployments.conftest import admission, running_app

    with running_app(ARGS):
        assert running_replicas() == 1
        burst = Load(serve_url, GEN, num_clients=12, max_tokens=200)
        try:
            peak = wait_for(lambda: (n := running_replicas()) > 1 and n, timeout_s=150,
                            what="a burst scaling past one replica")
        finally:
            burst.stop()
        assert burst.failures == [], burst.failures[:5]
        assert burst.outcomes["ok"] > 0

        trickle = Load(serve_url, GEN, num_clients=2, max_tokens=120, pause_s=0.5)
        try:  # light traffic keeps requests in flight on the replicas that drain
            wait_for(lambda: running_replicas() == 1, timeout_s=150,
                     what=f"scaling down from {peak} to min_replicas=1")
        finally:
            trickle.stop()
        assert trickle.failures == [], trickle.failures[:5]
        assert trickle.outcomes["ok"] > 0

        def settled() -> bool:
            pool = admission(serve_url).get(GEN, {})
            return (pool.get("reserved"), pool.get("num_leases"), pool.get("num_replicas")) == (
                0, 0, 1)

        wait_for(settled, timeout_s=30, what="admission back to one replica and no lease")
