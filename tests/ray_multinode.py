"""A real multi-node Ray cluster on this machine: a head and worker nodes, each started by
its own ``ray start --block`` process, with its own ports and its own temp dir.

Never the CLI's stop command: it kills every Ray process on the machine, other people's clusters
included. A node's processes are found by PID: the descendants of its ``ray start``
process, plus any process whose command line names the node's temp dir (made by
``mkdtemp``, so nobody else's). ``RayNode.kill`` signals exactly those PIDs, one by one;
that is also how a test removes a node mid-load.

| port                         | per node |
|------------------------------|----------|
| GCS (head ``--port``), client server | head only |
| node manager, object manager | yes      |
| dashboard agent http + grpc, runtime env agent, metrics export | yes |
| worker ports (a 40-port range) | yes    |
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.ray_cluster import free_port

RAY = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "ray")
NUM_WORKER_PORTS = 40
# Fast failure detection: a killed node is declared dead in about 5 s instead of 30 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 2000, "health_check_period_ms": 1000,
                      "health_check_timeout_ms": 2000, "health_check_failure_threshold": 5}


def node_env() -> dict[str, str]:
    """The environment for ``ray start`` and drivers: no inherited Ray address or job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    return env


def _worker_port_range(taken: set[int] = frozenset()) -> tuple[int, int]:
    """A run of free ports: the first free port of a 40-port stretch that is all free now
    and holds none of ``taken`` (ports already given to a node)."""
    for _ in range(50):
        base = free_port()
        if base + NUM_WORKER_PORTS < 65000 and all(_is_free(p) and p not in taken for p in
                                                   range(base, base + NUM_WORKER_PORTS)):
            return base, base + NUM_WORKER_PORTS - 1
    raise RuntimeError("found no run of 40 free ports for Ray workers")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _process_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry)] = (ppid, [a.decode(errors="replace") for a in argv if a])
    return table


@dataclass
class RayNode:
    name: str
    temp_dir: str
    process: subprocess.Popen
    log_path: str
    ports: dict[str, int] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """This node's processes: its ``ray start`` tree and whatever names its temp dir."""
        table = _process_table()
        mine = {self.process.pid} if self.process.poll() is None else set()
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _) in table.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    grew = True
        marker = self.temp_dir + "/"
        for pid, (_, argv) in table.items():
            if any(marker in arg or arg.endswith(self.temp_dir) for arg in argv):
                mine.add(pid)
        mine.discard(os.getpid())
        return sorted(mine)

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Signal each of this node's processes by PID; returns the PIDs signalled."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        return pids

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, a grace period, then SIGKILL for whatever is left."""
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.2)
        self.kill(signal.SIGKILL)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-4000:]


class LocalRayCluster:
    """A head (no GPUs) and worker nodes with fake GPUs, all on this machine."""

    def __init__(self, root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix="psmn-", dir="/tmp")  # short: sockets
        self.nodes: dict[str, RayNode] = {}
        self.gcs_port = 0
        self._given: set[int] = set()  # ports handed out: the kernel may offer one twice

    def _port(self) -> int:
        """A free port not yet given to any node of this cluster (a port closed after
        ``free_port`` can come back from the next call: Ray then refuses to start)."""
        while (port := free_port()) in self._given:
            pass
        self._given.add(port)
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start_head(self, num_cpus: int = 2, resources: dict | None = None) -> RayNode:
        self.gcs_port = self._port()
        args = ["--head", f"--port={self.gcs_port}", "--num-gpus=0",
                f"--ray-client-server-port={self._port()}", "--include-dashboard=false",
                f"--dashboard-port={self._port()}",  # its minimal head process still binds it
                f"--system-config={json.dumps(FAST_HEALTH_CHECKS)}"]
        node = self._start("head", args, num_cpus, resources)
        self.wait_started(node)
        return node

    def add_worker(self, name: str, num_gpus: int, num_cpus: int = 1,
                   resources: dict | None = None, wait: bool = True) -> RayNode:
        """A worker node; ``wait=False`` returns at once (call ``wait_started``), so
        several nodes start in parallel."""
        args = [f"--address={self.address}", f"--num-gpus={num_gpus}"]
        node = self._start(name, args, num_cpus, resources)
        if wait:
            self.wait_started(node)
        return node

    def stop(self, keep_files: bool = False) -> None:
        """Stop every node (by PID), then delete the temp dirs unless ``keep_files``."""
        for name in reversed(list(self.nodes)):
            self.nodes[name].stop()
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict | None
               ) -> RayNode:
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir, exist_ok=True)
        low, high = _worker_port_range(self._given)
        self._given.update(range(low, high + 1))
        ports = {"node-manager-port": self._port(), "object-manager-port": self._port(),
                 "dashboard-agent-listen-port": self._port(),
                 "dashboard-agent-grpc-port": self._port(),
                 "runtime-env-agent-port": self._port(), "metrics-export-port": self._port(),
                 "min-worker-port": low, "max-worker-port": high}
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               f"--num-cpus={num_cpus}", "--object-store-memory=100000000",
               "--disable-usage-stats", *args, *(f"--{k}={v}" for k, v in ports.items())]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        log_path = os.path.join(self.root, f"{name}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       env=node_env(), start_new_session=True)
        node = RayNode(name, temp_dir, process, log_path, ports)
        self.nodes[name] = node
        return node

    @staticmethod
    def wait_started(node: RayNode, timeout_s: float = 120.0) -> None:
        """Until its ``ray start --block`` says the node is up; raises with its log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"ray start for {node.name} exited "
                                   f"({node.process.returncode}):\n{node.log()}")
            if "block forever" in Path(node.log_path).read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray start for {node.name} not up after {timeout_s:.0f} s:\n"
                           f"{node.log()}")
