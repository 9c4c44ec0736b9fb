"""Where the CPU went during a benchmark run: CPU seconds per process of this process's
tree (the driver, Ray's GCS and raylet, every Ray worker: the Serve proxy, the ingress,
the engine replica, the admission controller), read from ``/proc``; and optionally a
``py-spy`` profile of each Python process (collapsed stacks, summarized by the
functions that hold the most samples).

Linux only (``/proc``); ``py-spy`` ships with Ray's default extras.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Self

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in raw if w]
    if not words:
        return "?"
    if words[0].startswith("ray::"):  # Ray sets its workers' titles
        return words[0].split()[0]
    return " ".join(Path(w).name if i == 0 else w for i, w in enumerate(words[:3]))[:60]


def tree(root: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) for ``root`` (default: this process) and descendants."""
    root = os.getpid() if root is None else root
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children = collections.defaultdict(list)
    for pid, (ppid, _) in stats.items():
        children[ppid].append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = (_name(pid), stats[pid][1])
            todo.extend(children[pid])
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two ``tree`` snapshots, summed by process name."""
    spent = collections.Counter()
    for pid, (name, cpu) in after.items():
        spent[name] += cpu - before.get(pid, (name, 0.0))[1]
    return {name: round(s, 2) for name, s in spent.most_common() if s >= 0.05}


class Profiler:
    """``py-spy record`` on every ``ray::`` process (and this driver) while a run lasts."""

    def __init__(self, out_dir: str | Path, label: str):
        self.dir = Path(out_dir) / label
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Self:
        spy = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")
        self.dir.mkdir(parents=True, exist_ok=True)
        for pid, (name, _) in tree().items():
            if not (name.startswith("ray::") or pid == os.getpid()):
                continue
            tag = f"{name.removeprefix('ray::').replace(':', '_')}-{pid}"
            cmd = [spy, "record", "-p", str(pid), "-r", "50", "-f", "raw", "--nonblocking",
                   "-o", str(self.dir / f"{tag}.txt")]
            self.procs.append((tag, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)))
        return self

    def __exit__(self, *exc) -> None:
        for _, proc in self.procs:  # SIGINT: py-spy writes its file and exits
            proc.send_signal(signal.SIGINT)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self, top: int = 15) -> dict[str, dict]:
        """Per process: samples, and the functions holding the most of them, as shares:
        ``self`` (the leaf frame) and ``inclusive`` (anywhere on the stack; the threads'
        entry frames left out)."""
        return {path.stem: top_functions(path, top) for path in sorted(self.dir.glob("*.txt"))}


_ENTRY_FRAMES = ("Thread.run", "Thread._bootstrap", "<module>", "Worker.main_loop",
                 "_run_module_as_main", "_run_code")


def _frame_name(frame: str) -> str:
    """``func (path/file.py:line)`` -> ``func (file.py)``."""
    func, _, where = frame.rpartition(" (")
    return f"{func} ({where.split(':')[0].rsplit('/', 1)[-1]})" if func else frame


def top_functions(path: Path, top: int) -> dict:
    """Self and inclusive shares of the frames in a py-spy raw (collapsed) file."""
    leaves, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), [_frame_name(f) for f in stack.split(";")]
        total += n
        leaves[frames[-1]] += n
        for name in set(frames):
            if not name.startswith(_ENTRY_FRAMES):
                inclusive[name] += n

    def shares(counter):
        return [(name, round(k / total, 3)) for name, k in counter.most_common(top)]

    return {"samples": total, "self": shares(leaves) if total else [],
            "inclusive": shares(inclusive) if total else []}
