"""``packserve``: ``serve`` builds the application from flags (the keys of ``AppArgs``) or
runs a config, and really serves (a subprocess with a Ray of its own in Ray Serve's
high-throughput mode, HAProxy in front, stopped by Ctrl-C); ``batch`` and ``probe`` take
the same model specs (``packaged:``, ``smoke:``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deployments.app.cli import main
from tests.ray_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0


def dry_run(capsys, *argv: str) -> dict:
    assert main(["serve", *argv, "--dry-run"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_flags_are_the_app_args_keys(capsys):
    config = dry_run(capsys, "smoke:decoder", "--name", "tiny", "--port", "9001",
                     "--max-model-len", "256", "--num-kv-blocks", "64", "--api-key", "k",
                     "--max-embedding-inputs", "16", "--admission-max-wait-s", "2",
                     "--ingress-num-replicas", "2", "--router-policy", "power_of_two",
                     "--no-normalize")
    assert config["http_options"] == {"host": "127.0.0.1", "port": 9001}
    (app,) = config["applications"]
    assert app["import_path"] == "deployments:build_app"
    assert app["args"] == {
        "models": [{"name": "tiny", "model": "smoke:decoder", "normalize": False,
                    "engine": {"max_model_len": 256, "num_kv_blocks": 64}}],
        "http": {"api_key": "k", "max_embedding_inputs": 16, "num_replicas": 2},
        "admission": {"max_wait_s": 2.0}, "router": {"policy": "power_of_two"}}


def test_lora_flags(capsys):
    """``--lora-modules NAME=PATH ...`` (vLLM's flag) becomes ``models[0].loras``; the
    engine's LoRA fields and the runtime switch are generated flags."""
    config = dry_run(capsys, "smoke:decoder", "--lora-modules", "sql=/a/sql", "chat=/a/chat",
                     "--max-loras", "4", "--max-lora-rank", "32", "--lora-runtime-updates")
    args = config["applications"][0]["args"]
    assert args["models"][0]["loras"] == [{"name": "sql", "path": "/a/sql"},
                                          {"name": "chat", "path": "/a/chat"}]
    assert args["models"][0]["engine"] == {"max_loras": 4, "max_lora_rank": 32}
    assert args["http"] == {"lora_runtime_updates": True}
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "smoke:decoder", "--lora-modules", "nopath", "--dry-run"])
    assert exit_.value.code == 2 and "NAME=PATH" in capsys.readouterr().err


def test_quantization_flags(capsys):
    """``--quantization`` and ``--kv-cache-dtype`` (vLLM's flags) are generated from the
    engine's fields; an unknown method exits 2 naming the field and the supported ones."""
    config = dry_run(capsys, "smoke:decoder", "--quantization", "fp8", "--kv-cache-dtype", "fp8")
    assert config["applications"][0]["args"]["models"][0]["engine"] == {
        "quantization": "fp8", "kv_cache_dtype": "fp8"}
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "smoke:decoder", "--quantization", "awq", "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "quantization: must be one of fp8, int8; got 'awq'" in err


def test_speculative_config_flag(capsys):
    """``--speculative-config`` takes vLLM's JSON; a bad key exits 2 naming it."""
    config = dry_run(capsys, "smoke:decoder", "--speculative-config",
                     '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert config["applications"][0]["args"]["models"][0]["engine"] == {
        "speculative": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}}
    for bad, said in (('{"method": "eagle"}', "speculative.method: must be one of ngram, draft"),
                      ("[1]", "must be a JSON object"), ("{x", "not JSON")):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "smoke:decoder", "--speculative-config", bad, "--dry-run"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and said in err, err


def test_bad_options_exit_2_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "smoke:decoder", "--max-prompt-chars", "0", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--max-prompt-chars" in err and "greater than or equal to 1" in err
    with pytest.raises(SystemExit):
        main(["serve", "--dry-run"])  # neither MODEL nor --config
    assert "MODEL or --config" in capsys.readouterr().err


def test_a_config_is_checked_strictly(capsys, tmp_path):
    config = dry_run(capsys, "--config", str(REPO / "cluster/local.yaml"))
    assert config["applications"][0]["args"]["models"][1]["model"] == "smoke:decoder"
    bad = yaml.safe_load((REPO / "cluster/local.yaml").read_text())
    bad["applications"][0]["args"]["models"][0]["engine"]["max_num_batch_tokens"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(tmp_path / "bad.yaml"), "--dry-run"])
    assert "max_num_batch_tokens: unknown key" in capsys.readouterr().err


def test_probe_takes_a_smoke_spec(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PACKSERVE_CACHE_DIR", str(tmp_path))
    assert main(["probe", "--model", "smoke:decoder", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "smoke-decoder" in out and "budget" in out.lower()


def test_batch_takes_a_packaged_spec(ray_cluster, tmp_path):
    docs = [{"id": f"d{i}", "text": f"packed, not padded {i}"} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--model", "packaged:all-MiniLM-L6-v2", "--task", "embed",
                 "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                 "--device", "cpu", "--num-actors", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    assert all(len(r["embedding"]) == 384 for r in rows)


def test_packserve_serve_serves_a_model_and_stops_on_ctrl_c():
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="pscli-", dir="/tmp"),
           "PACKSERVE_CACHE_DIR": tempfile.mkdtemp(prefix="ps-models-"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deployments.app.cli", "serve", "smoke:decoder", "--name", "tiny",
           "--port", str(port), "--metrics-port", str(metrics_port), "--max-model-len", "256",
           "--num-kv-blocks", "64", "--max-num-batched-tokens", "256"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C to stop" in line or (not line and proc.poll() is not None):
                break
        assert any("serving on" in x for x in lines), "".join(lines)[-3000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt="hello", max_tokens=3)
        assert out.usage.completion_tokens == 3
        chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=5,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.completions.create(model="tiny", prompt="hello", seed=2**64)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        assert "ray_packserve_" in metrics or "ray_" in metrics
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode in (0, 130), rest[-3000:]
        assert "stopped in" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # anything its Ray left behind: the process group we started, by its id
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_cpu_threads_follow_the_flag_then_num_cpus_then_the_cores(capsys):
    from deployments.app.config import ModelArgs

    config = dry_run(capsys, "smoke:decoder", "--cpu-threads", "3")
    assert config["applications"][0]["args"]["models"][0]["cpu_threads"] == 3
    assert ModelArgs(name="m", model="smoke:decoder", cpu_threads=3).torch_threads() == 3
    assert ModelArgs(name="m", model="smoke:decoder", num_cpus=2.5).torch_threads() == 2
    # num_cpus 0 (the default) reserves nothing: the replica runs on every core it may use
    cores = len(os.sched_getaffinity(0))
    assert ModelArgs(name="m", model="smoke:decoder").torch_threads() == cores
    with pytest.raises(ValueError, match="cpu_threads"):
        ModelArgs(name="m", model="smoke:decoder", cpu_threads=0)
