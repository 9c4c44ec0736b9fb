"""One source of truth for the Serve application on Kubernetes: the RayService
manifest's ``spec.serveConfigV2`` is cluster/cluster.yaml, verbatim.

    python -m deployments.app.kuberay render   # cluster.yaml -> the manifest's serveConfigV2
    python -m deployments.app.kuberay extract  # the manifest's serveConfigV2 -> cluster.yaml
    python -m deployments.app.kuberay check    # exit 1 with a diff when the two differ
    python -m deployments.app.kuberay env      # the proxy's guard variables, KEY=VALUE lines

``render`` rewrites only the ``serveConfigV2: |`` block of the manifest, as text, so the
rest of the manifest (its comments included) is kept. The test suite runs ``check``.

``check`` also checks every Ray container's environment for the variables Serve's proxy
reads at its start (``ray_env.guard_env``: the uvicorn guards and their limits, from the
Serve config's ``http`` section). ``packserve serve`` sets them on the Ray it starts; on
Kubernetes Ray starts in the pod, so the manifest must carry them, and a value that
differs from the Serve config's (or a missing one) is a failed ``check`` naming the
container and the variable. ``env`` prints them for a Ray started by hand (``env $(python
-m deployments.app.kuberay env) ray start ...`` on every node before ``serve run``).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import yaml

SERVE_CONFIG = "cluster/cluster.yaml"
MANIFEST = "cluster/rayservice.yaml"
_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: *\|[-+]?\d? *$")


class DriftError(ValueError):
    """The manifest's serveConfigV2 and the Serve config file differ."""


def manifest_serve_config(manifest_text: str) -> str:
    """The ``spec.serveConfigV2`` string of a RayService manifest."""
    doc = yaml.safe_load(manifest_text)
    try:
        text = doc["spec"]["serveConfigV2"]
    except (KeyError, TypeError):
        raise ValueError("the manifest has no spec.serveConfigV2") from None
    if not isinstance(text, str):
        raise TypeError("spec.serveConfigV2 must be a YAML string (a `|` block), "
                         f"got {type(text).__name__}")
    return text


def render(manifest_text: str, serve_config_text: str) -> str:
    """The manifest with its ``serveConfigV2: |`` block replaced by ``serve_config_text``."""
    lines = manifest_text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _KEY.match(line.rstrip("\n"))), None)
    if start is None:
        raise ValueError("the manifest has no `serveConfigV2: |` line to render into")
    indent = _KEY.match(lines[start].rstrip("\n"))["indent"]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > len(indent)):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep blank lines after the block
        end -= 1
    text = serve_config_text.rstrip("\n") + "\n"
    body = [f"{indent}  {line}" if line.strip() else "\n"
            for line in text.splitlines(keepends=True)]
    rendered = "".join(lines[:start] + [f"{indent}serveConfigV2: |\n"] + body + lines[end:])
    if manifest_serve_config(rendered) != text:
        raise ValueError("rendering did not round-trip; is the Serve config indented at "
                         "its first line?")
    return rendered


def drift(manifest_text: str, serve_config_text: str) -> str:
    """A unified diff from the Serve config file to the manifest's copy; '' when equal."""
    embedded = manifest_serve_config(manifest_text)
    expected = serve_config_text.rstrip("\n") + "\n"
    if embedded == expected:
        return ""
    return "".join(difflib.unified_diff(
        expected.splitlines(keepends=True), embedded.splitlines(keepends=True),
        fromfile=SERVE_CONFIG, tofile=f"{MANIFEST} spec.serveConfigV2"))


def guard_env_of(serve_config_text: str) -> dict[str, str]:
    """The proxy's guard variables for a Serve config (``http`` of its packserve app)."""
    import argparse

    from deployments.app import ray_env
    from deployments.app.serve_cli import http_args_of
    from deployments.http.client_limits import Limits

    config = yaml.safe_load(serve_config_text)
    return ray_env.guard_env(Limits.of(http_args_of(config, argparse.Namespace())))


def guard_env_problems(manifest_text: str, serve_config_text: str) -> list[str]:
    """One line per Ray container whose env lacks a guard variable or holds another value."""
    want = guard_env_of(serve_config_text)
    cluster = yaml.safe_load(manifest_text)["spec"]["rayClusterConfig"]
    groups = [("headGroupSpec", cluster["headGroupSpec"])] + [
        (f"workerGroupSpecs[{g.get('groupName', i)}]", g)
        for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    problems = []
    for where, group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for name, value in want.items():
                if env.get(name) != value:
                    problems.append(f"{where} container {container['name']}: env {name} is "
                                    f"{env.get(name)!r}, the Serve config gives {value!r}")
    return problems


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.app.kuberay",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["render", "extract", "check", "env"])
    parser.add_argument("--serve-config", default=SERVE_CONFIG)
    parser.add_argument("--manifest", default=MANIFEST)
    args = parser.parse_args(argv)
    try:
        return _run(args.command, Path(args.serve_config), Path(args.manifest))
    except (ValueError, TypeError) as exc:
        print(f"{args.manifest}: {exc}", file=sys.stderr)
        return 1


def _run(command: str, serve_path: Path, manifest_path: Path) -> int:
    if command == "env":
        for name, value in guard_env_of(serve_path.read_text()).items():
            print(f"{name}={value}")
        return 0
    manifest_text = manifest_path.read_text()
    if command == "render":
        manifest_path.write_text(render(manifest_text, serve_path.read_text()))
        print(f"rendered {serve_path} into {manifest_path} spec.serveConfigV2")
    elif command == "extract":
        serve_path.write_text(manifest_serve_config(manifest_text))
        print(f"extracted {manifest_path} spec.serveConfigV2 into {serve_path}")
    else:
        diff = drift(manifest_text, serve_path.read_text())
        if diff:
            print(f"{manifest_path} spec.serveConfigV2 has drifted from {serve_path}; run "
                  f"`python -m deployments.app.kuberay render` (or `extract` to keep the "
                  f"manifest's copy):\n{diff}", file=sys.stderr)
            return 1
        problems = guard_env_problems(manifest_text, serve_path.read_text())
        if problems:
            print(f"{manifest_path}: the Ray containers' env must carry the proxy's guard "
                  "variables (deployments/app/ray_env.py guard_env):\n  "
                  + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"{manifest_path} spec.serveConfigV2 matches {serve_path}, and every Ray "
              "container carries the proxy's guard variables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
