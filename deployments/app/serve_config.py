"""Strict validation of a Serve config file (cluster/*.yaml, a RayService's serveConfigV2).

Three checks, every problem reported with the path of its key:
1. Ray's ``ServeDeploySchema`` (types and values, as ``serve deploy`` checks them);
2. unknown keys, which ``ServeDeploySchema`` silently drops: the config is walked against
   the schema's pydantic models (nested models, lists of them, and the models inside
   ``Union[dict, Model]`` fields such as ``autoscaling_config``); free-form dicts
   (``runtime_env``, ``user_config``, ``resources``) are not walked;
3. for each application whose ``import_path`` is packserve's ``build_app``, its ``args``
   through ``AppArgs.parse`` (deployments/app/config.py).

``python -m deployments.app.serve_config FILE...`` checks files (a RayService manifest is
checked through its ``spec.serveConfigV2``); it exits 1 naming each bad key.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from deployments.app.config import AppArgs, AppConfigError

PACKSERVE_IMPORT_PATHS = ("deployments:build_app", "deployments.app.builder:build_app")


def validate_serve_config(config: dict) -> list[str]:
    """Every problem in a Serve config (a parsed YAML dict); ``[]`` when it is valid."""
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict):
        return [f"the Serve config must be a mapping, got {type(config).__name__}"]
    problems = [f"{path}: unknown key (Ray would ignore it; check its spelling)"
                for path in unknown_keys(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        problems += [f"{_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
    for i, app in enumerate(config.get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") in PACKSERVE_IMPORT_PATHS:
            try:
                AppArgs.parse(app.get("args"))
            except AppConfigError as exc:
                lines = str(exc).splitlines()[1:]
                problems += [f"applications[{i}]." + line.strip() for line in lines]
    return problems


def unknown_keys(value, annotation, path: str = "") -> list[str]:
    """Paths of keys in ``value`` that no pydantic model in ``annotation`` declares."""
    found: list[str] = []
    models = [t for t in _members(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
    if isinstance(value, dict) and models:
        model = models[0]
        for key, item in value.items():
            field = _field(model, key)
            where = f"{path}.{key}" if path else str(key)
            if field is None:
                found.append(where)
            else:
                found += unknown_keys(item, field.annotation, where)
    elif isinstance(value, list):
        for item_type in _list_items(annotation):
            for i, item in enumerate(value):
                found += unknown_keys(item, item_type, f"{path}[{i}]")
    return found


def _field(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _members(annotation) -> list:
    """The types a field may hold: Optional, Union and Annotated unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _list_items(annotation) -> list:
    return [typing.get_args(m)[0] for m in _members(annotation)
            if typing.get_origin(m) is list and typing.get_args(m)]


def _path(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def load_serve_config(path: str | Path) -> dict:
    """A Serve config file, or the ``serveConfigV2`` of a RayService manifest."""
    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and doc.get("kind") == "RayService":
        return yaml.safe_load(doc.get("spec", {}).get("serveConfigV2") or "{}")
    return doc


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m deployments.app.serve_config FILE...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        problems = validate_serve_config(load_serve_config(path))
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        if problems:
            status = 1
        else:
            print(f"{path}: ok")
    return status


if __name__ == "__main__":
    sys.exit(main())
