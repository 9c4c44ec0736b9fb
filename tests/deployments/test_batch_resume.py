"""Kill the driver of a running ``packserve batch`` with SIGKILL, run it again: the output
is complete, every id once, equal to the engine's direct results.

The job runs as a subprocess with its own local Ray cluster (``ray.init(address=
"local")``), started in a new session: the kill takes the driver's whole process group
(driver, GCS, raylet), and whatever else that session holds (Ray puts each worker in a
process group of its own) is waited for and, if still there, killed by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.deployments import test_batch
from tests.deployments.test_batch import (
    make_docs,
    read_output,
    reference_engine,
    token_ids,
    write_jsonl,
)

model_dir = test_batch.model_dir  # the fixture

REPO = Path(__file__).resolve().parents[2]
NUM_DOCS, SHARD = 3000, 50


def _command(model: Path, inp: Path, out: Path, summary: Path) -> list[str]:
    return [sys.executable, "-m", "deployments.batch", "--model", str(model), "--task", "embed",
            "--input", str(inp), "--output", str(out), "--shard-size", str(SHARD),
            "--device", "cpu", "--num-actors", "1", "--no-progress",
            "--summary-json", str(summary)]


def _env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _session_members(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[3]) == sid and stat[0] != "Z":
            pids.append(int(entry))
    return pids


def _reap_session(sid: int, grace_s: float = 30.0) -> list[int]:
    """Wait for the processes of session ``sid`` (one we started) to exit; SIGKILL the
    ones left after ``grace_s``, by PID. Returns the PIDs that had to be killed."""
    deadline = time.monotonic() + grace_s
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _session_members(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _wait_for_shards(manifest: Path, proc: subprocess.Popen, num: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= num:
            break
        time.sleep(0.02)
    return manifest.read_bytes().count(b"\n") if manifest.exists() else 0


def kill_then_rerun(command: list[str], out: Path, summary: Path,
                    num_shards: int) -> tuple[int, dict]:
    """Run ``command``, SIGKILL its whole session once 3 shards are done, check that
    nothing of it outlives the kill and that no output was published, run it again to
    the end; -> (shards done at the kill, the second run's summary)."""
    first = subprocess.Popen(command, cwd=REPO, env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        done_at_kill = _wait_for_shards(out.with_name(out.name + ".parts") / "manifest.jsonl",
                                        first, 3, timeout_s=240)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        stderr = first.communicate()[1].decode(errors="replace")
        killed_late = _reap_session(first.pid)
    assert first.returncode == -signal.SIGKILL, stderr[-3000:]
    assert 3 <= done_at_kill < num_shards and not out.exists()
    assert not killed_late, f"processes of the killed job outlived it: {killed_late}"

    second = subprocess.Popen(command, cwd=REPO, env=_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stderr = second.communicate(timeout=300)[1]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.communicate()
        _reap_session(second.pid)
    assert second.returncode == 0, stderr[-3000:]
    s = json.loads(summary.read_text())
    assert s["num_shards_resumed"] >= done_at_kill and s["num_shards"] == num_shards
    return done_at_kill, s


def test_sigkill_the_driver_then_rerun(model_dir, tmp_path):
    docs = make_docs(NUM_DOCS, seed=7)
    inp = write_jsonl(tmp_path / "docs.jsonl", docs)
    out, summary = tmp_path / "emb.jsonl", tmp_path / "summary.json"
    command = _command(model_dir, inp, out, summary)
    done_at_kill, s = kill_then_rerun(command, out, summary, NUM_DOCS // SHARD)
    assert s["run_docs"] + s["num_shards_resumed"] * SHARD == NUM_DOCS

    got = read_output(out)
    assert [r["id"] for r in got] == [d["id"] for d in docs]  # complete, each id once, in order
    assert (tmp_path / "emb.errors.jsonl").read_text() == ""
    assert not list(out.with_name("emb.jsonl.parts").glob("*.tmp"))
    with reference_engine(model_dir) as engine:
        want = engine.embed(token_ids(model_dir, docs))
    np.testing.assert_allclose(np.array([r["embedding"] for r in got], np.float32), want,
                               rtol=1e-4, atol=1e-5)
