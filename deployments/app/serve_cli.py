"""``packserve serve``: run the Serve application, in the style of ``vllm serve``.

    packserve serve MODEL [--name ID] [--port 8000] [--max-model-len N] [--api-key KEY] ...
    packserve serve --config cluster/local.yaml

With MODEL, the application for that one model is built from flags, which are the keys
of ``AppArgs`` (deployments/app/config.py), generated from it so a new key gets its flag:

| flags                                   | ``AppArgs`` keys                         |
|-----------------------------------------|------------------------------------------|
| ``--num-replicas``, ``--num-gpus``, ... | ``models[0].*`` (the model's deployment) |
| ``--max-model-len``, ``--dtype``, ...   | ``models[0].engine.*`` (``EngineConfig``; ``--speculative-config JSON`` is ``speculative``, as vLLM names it) |
| ``--api-key``, ``--max-prompt-chars``, ...| ``http.*`` (``--ingress-num-replicas``, ``--ingress-max-ongoing-requests``) |
| ``--admission-max-wait-s``, ``--no-admission``, ...| ``admission.*``                 |
| ``--router-policy``, ``--router-stats-period-s`` | ``router.*``                    |

Only the flags given are set; the rest keep ``AppArgs``' defaults. ``--config FILE``
runs a Serve config instead (strictly checked first, as ``python -m
deployments.app.serve_config`` does). Either way Ray is started locally (its own instance,
never one it finds) unless ``--address`` names a cluster, the Ray metrics of this node
are served on ``--metrics-port`` (8080; ``dashboards/prometheus.yml`` scrapes it) on the
API's host (loopback by default; ``--metrics-host``), a locally started Ray runs Ray
Serve's high-throughput mode (``deployments/app/ray_env.py``; ``--no-ray-throughput-mode``
for the default one), both modes with the ``http`` section's client limits
(``deployments/http/guards.py``, ``deployments/http/uvicorn_guard.py``), and Ctrl-C (or
SIGTERM) drains (``deployments/app/drain.py``: new requests get 503, in-flight ones get
``--drain-timeout`` seconds, streams then end with an error event and ``[DONE]``), then
deletes the application and stops what was started. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import typing
from typing import Literal

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_METRICS_PORT = "127.0.0.1", 8000, 8080
APP_NAME = "packserve"
# AppArgs section -> (flag prefix, flags renamed because another section has the key)
SECTIONS = {"model": ("", {}), "engine": ("", {"speculative": "speculative-config"}),
            "http": ("", {"num_replicas": "ingress-num-replicas",
                          "max_ongoing_requests": "ingress-max-ongoing-requests",
                          "drain_timeout_s": "drain-timeout"}),
            "admission": ("admission-", {"enabled": "admission"}),
            "router": ("router-", {})}
NOT_FLAGS = {"model": {"name", "model", "engine", "autoscaling", "loras"},
             "engine": {"lora_modules"}}  # adapters: --lora-modules NAME=PATH ...


class ServeOptionError(ValueError):
    """A bad option or config; the message names it."""


def _fields(section: str) -> dict[str, type]:
    from deployments.app.config import AdmissionArgs, EngineArgs, HTTPArgs, ModelArgs, RouterArgs

    model = {"model": ModelArgs, "engine": EngineArgs, "http": HTTPArgs,
             "admission": AdmissionArgs, "router": RouterArgs}[section]
    skip = NOT_FLAGS.get(section, set())
    return {name: f.annotation for name, f in model.model_fields.items() if name not in skip}


def _flag(section: str, key: str) -> str:
    prefix, renamed = SECTIONS[section]
    return "--" + renamed.get(key, prefix + key.replace("_", "-"))


ALIASES = {"engine.tensor_parallel_size": ("-tp",)}  # vLLM's short flag


def _argument(group, section: str, key: str, annotation) -> None:
    """One generated flag; its dest is ``section.key`` and its default None (unset)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = args[0]
    dest = f"{section}.{key}"
    if kind is bool:
        group.add_argument(_flag(section, key), dest=dest, default=None,
                           action=argparse.BooleanOptionalAction)
    elif kind is dict:  # a JSON object, as vLLM's --speculative-config takes it
        group.add_argument(_flag(section, key), dest=dest, default=None, type=_json_object,
                           metavar="JSON")
    elif typing.get_origin(kind) is Literal:
        group.add_argument(_flag(section, key), dest=dest, default=None,
                           choices=[str(c) for c in typing.get_args(kind)])
    else:
        flags = [_flag(section, key), *ALIASES.get(dest, ())]
        group.add_argument(*flags, dest=dest, default=None,
                           type=kind if kind in (int, float) else str, metavar=key.upper())


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a model (or a Serve config) over an "
                       "OpenAI-compatible HTTP API", description=__doc__.split("\n\n")[0])
    p.set_defaults(handler=run_serve)
    p.add_argument("model", nargs="?", help="hub id, local directory, packaged:NAME or "
                   "smoke:decoder")
    p.add_argument("--config", help="a Serve config (e.g. cluster/local.yaml) instead of MODEL")
    p.add_argument("--name", help="the model id clients send (default: MODEL)")
    p.add_argument("--host", default=None, help=f"HTTP host (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"HTTP port (default {DEFAULT_PORT})")
    p.add_argument("--address", help="run on this Ray cluster (default: start a local one)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="Ray's Prometheus endpoint of a locally started node (0: any port)")
    p.add_argument("--metrics-host", default=None,
                   help="where that endpoint listens: a loopback address, or 0.0.0.0 (all "
                   "interfaces; Ray can bind nothing else) (default: loopback when the API's "
                   "host is loopback, else all interfaces)")
    p.add_argument("--ray-throughput-mode", default=True, action=argparse.BooleanOptionalAction,
                   help="Ray Serve's high-throughput mode (HAProxy, direct ingress, gRPC "
                   "between replicas) for a locally started Ray (deployments/app/ray_env.py)")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", default=None,
                   help="LoRA adapters (PEFT directories) served on MODEL; clients name one "
                   "as the model (vLLM's flag; enables engine.enable_lora)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the application's arguments (or check the config) and exit")
    for section in SECTIONS:
        group = p.add_argument_group(f"{section} (AppArgs.{'models[0]' if section == 'model' else section}"
                                     f"{'.engine' if section == 'engine' else ''})")
        for key, annotation in _fields(section).items():
            _argument(group, section, key, annotation)
    return p


def app_args_from(args: argparse.Namespace) -> dict:
    """``AppArgs`` (as a dict) from the flags given; raises ``ServeOptionError``."""
    from deployments.app.config import AppArgs, AppConfigError

    given: dict[str, dict] = {section: {} for section in SECTIONS}
    for dest, value in vars(args).items():
        section, _, key = dest.partition(".")
        if key and value is not None:
            given[section][key] = value
    model = {"name": args.name or args.model, "model": args.model, **given["model"]}
    if args.lora_modules:
        model["loras"] = [_lora_module(m) for m in args.lora_modules]
    if given["engine"]:
        model["engine"] = given["engine"]
    out = {"models": [model]}
    out.update({s: given[s] for s in ("http", "admission", "router") if given[s]})
    try:
        AppArgs.parse(out)
    except AppConfigError as exc:
        raise ServeOptionError(_flags_named(str(exc))) from None
    return out


def _lora_module(text: str) -> dict:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ServeOptionError(f"--lora-modules takes NAME=PATH pairs, got {text!r}")
    return {"name": name, "path": path}


def _flags_named(message: str) -> str:
    """A config error with each ``args.<section>.<key>`` followed by its flag."""
    lines = []
    for line in message.splitlines():
        for section in SECTIONS:
            root = {"model": "args.models[0].", "engine": "args.models[0].engine."}.get(
                section, f"args.{section}.")
            for key in _fields(section):
                if line.strip().startswith(root + key + ":"):
                    line = line.replace(root + key, f"{root + key} ({_flag(section, key)})", 1)
        lines.append(line)
    return "\n".join(lines)


def load_config(path: str) -> dict:
    import yaml

    from deployments.app.serve_config import validate_serve_config

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise ServeOptionError(f"--config {path}: {exc}") from None
    problems = validate_serve_config(config)
    if problems:
        raise ServeOptionError(f"--config {path}:\n  " + "\n  ".join(problems))
    return config


def http_args_of(config: dict, args: argparse.Namespace):
    """The ``http`` section the CLI enforces outside the app (proxies, drain): the first
    packserve application's (``--drain-timeout`` wins)."""
    from deployments.app.config import AppArgs

    apps = [a for a in config.get("applications", [])
            if a.get("import_path") == "deployments:build_app"]
    http = AppArgs.parse(apps[0]["args"]).http if apps else AppArgs.model_fields[
        "http"].default_factory()
    timeout = getattr(args, "http.drain_timeout_s", None)
    return http.model_copy(update={"drain_timeout_s": timeout}) if timeout is not None else http


def run_serve(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.config):
        raise ServeOptionError("give MODEL or --config FILE (one of them)")
    if args.config:
        config = load_config(args.config)
        http = config.setdefault("http_options", {})
        http["host"] = args.host or http.get("host", DEFAULT_HOST)
        http["port"] = args.port or http.get("port", DEFAULT_PORT)
    else:
        config = {"proxy_location": "HeadOnly",
                  "http_options": {"host": args.host or DEFAULT_HOST,
                                   "port": args.port or DEFAULT_PORT},
                  "applications": [{"name": APP_NAME, "route_prefix": "/",
                                    "import_path": "deployments:build_app",
                                    "args": app_args_from(args)}]}
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(config, sort_keys=False))
        return 0
    args.http_args = http_args_of(config, args)
    host = config["http_options"]["host"]
    args.metrics_loopback = _is_loopback(args.metrics_host or host)
    if args.address is None:  # a Ray of our own: its processes inherit these (before import)
        from deployments.app import ray_env
        from deployments.http.client_limits import Limits

        limits = Limits.of(args.http_args)
        env = ray_env.guard_env(limits)
        if args.ray_throughput_mode:
            env.update(ray_env.throughput_env(local=True))
            args.scratch = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
            env.update(ray_env.haproxy_env(limits, args.scratch))
        if args.metrics_loopback:
            env.update(ray_env.LOOPBACK_NODE_ENV)
        ray_env.apply(env)
    return _serve_until_stopped(config, args)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_until_stopped(config: dict, args: argparse.Namespace) -> int:
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    started = time.monotonic()
    if args.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray of our own, on this host
        # Ray's metrics agent binds loopback when the node's IP is loopback, else all
        # interfaces (it has no host setting): the node IP decides where metrics listen
        # (ray_env.LOOPBACK_NODE_ENV makes it 127.0.0.1 for a loopback API).
        ray.init(address="local", namespace="serve", include_dashboard=False,
                 _metrics_export_port=args.metrics_port or None)
    else:
        ray.init(address=args.address, namespace="serve")
    # What `serve run CONFIG` does: start Serve with the config's HTTP options, deploy.
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    from deployments.app import drain

    drain.clear([a.name for a in schema.applications])  # none left by an earlier run
    client.deploy_apps(schema, _blocking=False)
    stop = _StopSignal()
    try:
        _wait_running([a.name for a in schema.applications], stop)
        http = schema.http_options
        print(f"packserve: serving on http://{http.host}:{http.port}/v1 after "
              f"{time.monotonic() - started:.0f} s (models: GET /v1/models, health: "
              f"/health)", flush=True)
        if args.address is None and args.metrics_port:
            where = "127.0.0.1" if args.metrics_loopback else ray.util.get_node_ip_address()
            print(f"packserve: Ray metrics (Prometheus) on http://{where}:{args.metrics_port}"
                  f"/metrics{'' if args.metrics_loopback else ' (all interfaces)'}", flush=True)
        print("packserve: Ctrl-C to stop", flush=True)
        stop.wait()
        drain.drain([a.name for a in schema.applications], args.http_args.drain_timeout_s)
    finally:
        _shutdown(schema, args.address is None)
        scratch = getattr(args, "scratch", None)
        if scratch and os.path.basename(scratch).startswith("psh-"):  # ours: ray_env made it
            shutil.rmtree(scratch, ignore_errors=True)
    return 130 if stop.interrupted else 0


class _StopSignal:
    """Set by SIGINT or SIGTERM."""

    def __init__(self):
        self.interrupted = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def wait(self) -> None:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _wait_running(names: list[str], stop: _StopSignal) -> None:
    from ray import serve

    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n in names if states[n] == "DEPLOY_FAILED"}
        if failed:
            raise ServeOptionError("deploying failed: " + "; ".join(
                f"{n}: {m}" for n, m in failed.items()))
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(0.5)


def _shutdown(schema, local: bool) -> None:
    """Delete the applications (on a shared cluster) or stop Serve and our Ray."""
    import ray
    from ray import serve

    t0 = time.monotonic()
    print("packserve: stopping...", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once
    try:
        if local:
            serve.shutdown()
        else:
            for app in schema.applications:
                serve.delete(app.name)
    finally:
        from deployments.app import drain

        drain.clear([a.name for a in schema.applications])
        ray.shutdown()
    print(f"packserve: stopped in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

