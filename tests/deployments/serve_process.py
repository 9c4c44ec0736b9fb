"""``packserve serve`` as a subprocess with a Ray of its own (as tests/deployments/
test_cli.py runs it): started, waited for, and killed by its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.ray_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0
TINY = ["smoke:decoder", "--name", "tiny", "--max-model-len", "256", "--num-kv-blocks", "64",
        "--max-num-batched-tokens", "256"]


class Served:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port, self.lines = proc, port, []
        self.url = f"http://127.0.0.1:{port}"
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_exit(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


@contextlib.contextmanager
def packserve_serve(*flags: str):
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="pss-", dir="/tmp"),
           "PACKSERVE_CACHE_DIR": tempfile.mkdtemp(prefix="ps-models-"),
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "deployments.app.cli", "serve", *TINY, "--port", str(port),
           "--metrics-port", str(free_port()), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    served = Served(proc, port)
    served._reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if any("Ctrl-C to stop" in x for x in served.lines):
                break
            time.sleep(0.2)
        assert any("serving on" in x for x in served.lines), served.output()[-3000:]
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything its Ray left behind: the process group we started, by its id
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
