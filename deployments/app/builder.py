"""``build_app``: the Serve application from its arguments (the configs' import_path).

One ``AdmissionController`` (cluster-wide), one engine deployment per model
(``num_replicas`` replicas, ``num_gpus`` each: one replica per GPU on GPU nodes), and
the ``OpenAIIngress`` in front, holding a handle to each.
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.admission.controller import AdmissionController
from deployments.app.config import AppArgs, ModelArgs, RouterArgs
from deployments.http.ingress import OpenAIIngress
from deployments.replica.autoscaling import serve_autoscaling_config
from deployments.replica.deployment import EngineReplica
from deployments.replica.ranks import bundles

ROUTER_CLASSES = {"free_budget": "deployments.admission.router:FreeBudgetRouter",
                  "prefix_aware": "deployments.admission.router:PrefixAwareRouter"}
HEALTH_CHECK_PERIOD_S = 5.0
INGRESS_SHUTDOWN_MARGIN_S = 10.0  # past the drain deadline: the ended streams flush
# Serve logs one access line per call; the engines' and the controller's calls come
# from the ingress and the heartbeats (several a second when idle), not from clients.
INTERNAL_LOGGING = {"enable_access_log": False}


def deployment_name(model_name: str) -> str:
    """The Serve deployment of a model's replicas (Serve names allow any characters but
    '#' and '/'; model ids may contain '/')."""
    return "engine-" + model_name.replace("/", "--").replace("#", "-")


def engine_deployment(m: ModelArgs, router: RouterArgs) -> serve.Deployment:
    options = {
        "name": deployment_name(m.name), "num_replicas": m.num_replicas,
        "ray_actor_options": {"num_gpus": m.num_gpus, "num_cpus": m.num_cpus},
        "max_ongoing_requests": m.max_ongoing_requests,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": 30.0,
        "logging_config": INTERNAL_LOGGING,
    }
    tp = m.engine.tensor_parallel_size or 1
    if tp > 1:  # one bundle per rank on one node: the replica in 0, rank r's actor in r
        placed = bundles(tp, m.num_gpus, m.num_cpus)
        options["placement_group_bundles"] = placed
        options["placement_group_strategy"] = "STRICT_PACK"
        options["ray_actor_options"] = {"num_gpus": placed[0].get("GPU", 0),
                                        "num_cpus": placed[0]["CPU"]}
    if m.autoscaling is not None:
        del options["num_replicas"]
        options["autoscaling_config"] = serve_autoscaling_config(m.autoscaling)
    if router.policy in ROUTER_CLASSES:  # power_of_two: Serve's own
        kwargs = {}
        if router.policy == "prefix_aware":
            kwargs = {"min_free_fraction": router.prefix_min_free_fraction,
                      "ttl_s": router.prefix_ttl_s, "max_entries": router.prefix_max_entries,
                      "lora_min_free_fraction": router.lora_min_free_fraction}
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASSES[router.policy], request_router_kwargs=kwargs,
            request_routing_stats_period_s=router.stats_period_s)
    return serve.deployment(EngineReplica).options(**options)


def build_app(args: dict | None = None) -> serve.Application:
    """The packserve application; ``args`` as in cluster/*.yaml (validated strictly)."""
    app_args = AppArgs.parse(args)
    admission_args = app_args.admission.model_dump()
    admission = (AdmissionController.options(logging_config=INTERNAL_LOGGING).bind(admission_args)
                 if app_args.admission.enabled else None)
    models = {
        m.name: engine_deployment(m, app_args.router).bind(m.model_dump(), admission_args,
                                                            admission)
        for m in app_args.models
    }
    ingress = serve.deployment(OpenAIIngress).options(
        num_replicas=app_args.http.num_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=app_args.http.max_ongoing_requests,
        # Serve's stop (a rolling upgrade, serve.delete) waits this long for the ingress's
        # requests; the ingress ends its own at http.drain_timeout_s (draining.py), before
        graceful_shutdown_timeout_s=app_args.http.drain_timeout_s + INGRESS_SHUTDOWN_MARGIN_S,
        graceful_shutdown_wait_loop_s=0.5)
    return ingress.bind(app_args.model_dump(), admission, models)
