"""What machine and software a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import os
import platform
import subprocess


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """CPU, core count, Python and library versions, git commit, and the GPU when there is one."""
    info = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": _git_commit(),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    import packing_cy

    info["packer"] = packing_cy.IMPLEMENTATION
    return info
