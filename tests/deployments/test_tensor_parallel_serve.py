"""``packserve serve MODEL --tensor-parallel-size 2`` on CPU (issue 22): the engine replica
is deployed with a placement group of two bundles, starts its second rank as a Ray actor
in bundle 1, and serves streamed completions and embeddings through the openai client; a
killed rank fails its streams cleanly and the replica comes back; Ctrl-C leaves no rank
process behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.deployments.serve_process import packserve_serve


def _descendants(root: int) -> dict[int, str]:
    """Every live process under ``root`` (by /proc parent links): pid -> command line."""
    parents, cmds = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmds[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = cmds.get(child, "")
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in (
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1] or [""])[0]


def _ranks(root: int) -> list[int]:
    """The follower ranks: Ray actors (``RankWorker``) in the replica's placement group."""
    return [p for p, cmd in _descendants(root).items() if "RankWorker" in cmd]


@pytest.mark.parametrize("gpus, bundle", [(4, {"GPU": 1, "CPU": 0.001}), (0, {"CPU": 0.001})])
def test_a_replica_of_four_ranks_asks_for_four_bundles_on_one_node(gpus, bundle):
    from deployments.app.builder import engine_deployment
    from deployments.app.config import AppArgs

    app = AppArgs.parse({"models": [{"name": "m", "model": "smoke:decoder", "num_gpus": gpus,
                                     "engine": {"tensor_parallel_size": 4}}]})
    replica = engine_deployment(app.models[0], app.router)._replica_config
    assert replica.placement_group_bundles == [bundle] * 4  # rank r's actor in bundle r
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.ray_actor_options["num_gpus"] == bundle.get("GPU", 0)  # rank 0's GPU


def test_two_ranks_serve_fail_a_killed_rank_cleanly_and_stop_with_ctrl_c():
    """One server (each start costs most of a minute): streamed completions, a constrained
    choice with n=2, and packed embeddings across both ranks; rank 1 killed mid-stream
    ends the stream with an error event and ``[DONE]`` (never a cut body), Serve's health
    check replaces the replica, whose new rank 1 serves the next completion, with no
    admission lease left; Ctrl-C then leaves no rank process."""
    with packserve_serve("--tensor-parallel-size", "2") as s:
        (rank,) = _ranks(s.proc.pid)  # rank 1, an actor in the replica's placement group
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        whole = client.completions.create(model="tiny", prompt="The capital of France is",
                                          max_tokens=12, temperature=0)
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0,
            stream=True))
        assert whole.usage.completion_tokens == 12 and text == whole.choices[0].text
        # rank 0's sampling side: a constraint, n choices, penalties, on the full logits
        chosen = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=8,
                                           n=2, seed=3, temperature=1.0, presence_penalty=1.0,
                                           extra_body={"guided_choice": ["alpha", "beta"]})
        assert len(chosen.choices) == 2
        assert all(c.text in ("alpha", "beta") for c in chosen.choices), chosen.choices
        facts = {m.id: m for m in client.models.list().data}["tiny"].model_extra["packserve"]
        assert "embeddings" in facts["tasks"], facts
        vectors = client.embeddings.create(model="tiny", input=["hi", "hello there", "hi"])
        first, _, again = (d.embedding for d in vectors.data)
        assert len(first) == facts["dimensions"]
        assert first == pytest.approx(again, abs=1e-5)  # the same text, elsewhere in a bin

        events = []
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "hi", "max_tokens": 200, "stream": True,
                "ignore_eos": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(rank, signal.SIGKILL)
        assert events[-1] == "[DONE]", events[-3:]
        assert '"error"' in events[-2] and len(events) < 200, events[-3:]
        deadline, got = time.monotonic() + 180, None
        while time.monotonic() < deadline and got is None:
            try:
                got = client.completions.create(model="tiny", prompt="hi", max_tokens=4)
            except openai.APIError:
                time.sleep(2)  # 503 until Serve has replaced the replica
        assert got is not None and got.usage.completion_tokens == 4, s.output()[-3000:]
        assert not _alive(rank)
        ranks = _ranks(s.proc.pid)
        assert len(ranks) == 1 and ranks != [rank]
        deadline, pool = time.monotonic() + 60, None
        while time.monotonic() < deadline:  # the dead replica's lease is dropped
            pool = httpx.get(f"{s.url}/v1/admission", timeout=30).json()["tiny"]
            if not pool["reserved"] and not pool["num_leases"]:
                break
            time.sleep(1)
        assert not pool["reserved"] and not pool["num_leases"], pool

        s.proc.send_signal(signal.SIGINT)
        assert s.wait_exit(120) in (0, 130)
        assert "stopped in" in s.output(), s.output()[-3000:]
        assert not [p for p in ranks if _alive(p)]
