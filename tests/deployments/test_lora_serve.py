"""LoRA adapters over HTTP with the official ``openai`` client: an adapter named as the
model (and as ``base:adapter``), streamed and not, with guided decoding, ``n`` and
penalties; ``/v1/models`` lists adapters with their parent; the run-time load and unload
endpoints and every refusal; the ingress's registry and metric labels on their own."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from benchmarks.adapters import ALL_LINEAR
from tests.deployments.conftest import drained_app, replica_handle
from tests.lora_factories import make_adapter

GEN, APP, PREFIX = "lora-base", "lora", "/lora"
MAX_NEW = 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three adapters of the smoke decoder: two declared in the config, one (and a
    variant of it, and refused ones) to load at run time."""
    from worker.models.sources import resolve_model

    base = resolve_model("smoke:decoder")
    d = tmp_path_factory.mktemp("lora-serve")
    return {"sql": make_adapter(base, d / "sql", r=8, seed=1, scale=0.2),
            "chat": make_adapter(base, d / "chat", r=16, targets=ALL_LINEAR, seed=2, scale=0.1),
            "late": make_adapter(base, d / "late", r=4, seed=3, scale=0.2),
            "late2": make_adapter(base, d / "late2", r=4, seed=4, scale=0.2),
            "wide": make_adapter(base, d / "wide", r=32, seed=5, scale=0.2),
            "base": base}


@pytest.fixture(scope="module")
def url(serve_url, adapters):
    args = {"models": [{"name": GEN, "model": "smoke:decoder",
                        "engine": {"max_model_len": 512, "num_kv_blocks": 256,
                                   "max_num_batched_tokens": 512, "max_loras": 2,
                                   "max_lora_rank": 16},
                        "loras": [{"name": "sql", "path": str(adapters["sql"])},
                                  {"name": "chat", "path": str(adapters["chat"])}]}],
            "http": {"lora_runtime_updates": True}}
    with drained_app(serve_url, args, APP, PREFIX) as u:
        yield u


@pytest.fixture(scope="module")
def reference(adapters):
    """The same model in this process, every adapter registered: what HTTP must return."""
    from worker import Engine, EngineConfig

    loras = tuple((n, str(adapters[n])) for n in ("sql", "chat", "late", "late2"))
    with Engine(EngineConfig("smoke:decoder", lora_modules=loras, max_model_len=512)) as e:
        yield e


def _client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _reference_text(reference, prompt_ids, lora):
    from worker.generate.sampling import SamplingParams

    out = reference.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                          ignore_eos=True), lora=lora)[0]
    return out.text


PROMPT = [11, 240, 87, 1033, 5, 99, 2048, 17, 301, 44, 12, 600, 78, 9]


def test_models_lists_adapters_with_their_parent(url, adapters):
    listed = {m.id: m for m in _client(url).models.list().data}
    assert set(listed) >= {GEN, "sql", "chat"}
    assert listed["sql"].model_extra["parent"] == GEN
    assert listed["sql"].model_extra["root"] == str(adapters["sql"])
    one = httpx.get(f"{url}/v1/models/{GEN}:chat", timeout=30).json()
    assert one["id"] == "chat" and one["parent"] == GEN


def test_an_adapter_as_the_model_streamed_and_not(url, reference):
    client = _client(url)
    kw = dict(prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True})
    texts = {}
    for model in ("sql", f"{GEN}:sql", "chat", GEN):
        r = client.completions.create(model=model, **kw)
        assert r.model == model and r.usage.completion_tokens == MAX_NEW
        texts[model] = r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="sql", stream=True, **kw) if c.choices)
    assert texts["sql"] == texts[f"{GEN}:sql"] == streamed
    assert texts["sql"] == _reference_text(reference, PROMPT, "sql")
    assert texts["chat"] == _reference_text(reference, PROMPT, "chat")
    assert texts[GEN] == _reference_text(reference, PROMPT, None)
    assert len({texts["sql"], texts["chat"], texts[GEN]}) == 3  # each adapter changes it


def test_chat_with_an_adapter_guided_n_and_penalties(url):
    client = _client(url)
    r = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "pick one"}], n=2,
        max_tokens=12, temperature=0.8, seed=3, frequency_penalty=0.5, presence_penalty=0.3,
        extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert [c.message.content in ("alpha", "beta", "gamma") for c in r.choices] == [True] * 2
    chunks = list(client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        stream=True, temperature=0))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_adapters_serve_generation_only(url):
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "sql", "input": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "LoRA adapter" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and "sql" in r.json()["error"]["message"]


def _load(url, **body):
    return httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)


def _unload(url, name):
    return httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


@pytest.mark.parametrize("body, status, param, words", [
    ({"lora_name": "x", "lora_path": "/no/such/dir"}, 400, "lora_path", "no directory"),
    ({"lora_name": "x", "lora_path": "@wide"}, 400, "max_lora_rank", "rank 32"),
    ({"lora_name": "x", "lora_path": "@base"}, 400, "lora_path", "adapter_config.json is "
     "missing"),
    ({"lora_name": "sql", "lora_path": "@late"}, 400, "lora_name", "taken by a loaded adapter"),
    ({"lora_name": GEN, "lora_path": "@late"}, 400, "lora_name", "taken by a served model"),
    ({"lora_name": "x", "lora_path": "@late", "base_model_name": "other"}, 400,
     "base_model_name", "not a served model"),
    ({"lora_name": "x"}, 400, "lora_path", "lora_path"),
])
def test_load_refusals(url, adapters, body, status, param, words):
    body = {k: str(adapters[v[1:]]) if isinstance(v, str) and v.startswith("@") else v
            for k, v in body.items()}
    r = _load(url, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_load_use_unload_and_load_again(url, adapters, reference):
    """An adapter loaded at run time is listed and served; unloading it while a request
    of it streams is a 409; once unloaded it is a 404; loaded again from another
    directory under the same name, the replica serves the new weights."""
    assert _load(url, lora_name="late", lora_path=str(adapters["late"])).status_code == 200
    assert "late" in {m.id for m in _client(url).models.list().data}
    client = _client(url)
    kw = dict(prompt=PROMPT, max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True})
    first = client.completions.create(model="late", **kw).choices[0].text
    assert first == _reference_text(reference, PROMPT, "late")

    started, release = threading.Event(), threading.Event()

    def stream():
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "late", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True,
                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    release.wait(60)

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    r = _unload(url, "late")
    release.set()
    t.join(120)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use", r.text
    deadline = time.monotonic() + 30
    while (r := _unload(url, "late")).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.2)  # the stream's end reaches the ingress
    assert r.status_code == 200 and r.json()["deleted"] is True
    gone = httpx.post(f"{url}/v1/completions", json={"model": "late", "prompt": "x"}, timeout=30)
    assert gone.status_code == 404
    assert _unload(url, "late").status_code == 404
    assert _unload(url, "sql").status_code == 400  # declared in the config

    assert _load(url, lora_name="late", lora_path=str(adapters["late2"])).status_code == 200
    again = client.completions.create(model="late", **kw).choices[0].text
    assert again == _reference_text(reference, PROMPT, "late2") != first
    state = replica_handle(GEN, APP).state.remote().result(timeout_s=30)["lora"]
    assert "late" in state["registered"] and state["num_loads"] >= 3


def test_registry_switch_and_metric_labels_on_their_own():
    import asyncio

    from deployments.app.config import AppArgs
    from deployments.app.metrics import MAX_LORA_LABELS, IngressMetrics
    from deployments.http.errors import APIError
    from deployments.http.loras import AdapterRegistry

    args = AppArgs.parse({"models": [{"name": "m", "model": "smoke:decoder",
                                      "loras": [{"name": "a", "path": "/x"}]}]})
    registry = AdapterRegistry(args, 0)
    served = {"m": object()}
    with pytest.raises(APIError) as off:
        asyncio.run(registry.load("b", "/y", None, served))
    assert off.value.status == 403 and off.value.param == "lora_runtime_updates"
    assert registry.resolve("a", served)[0] == "m" and registry.resolve("m:a", served)[0] == "m"
    with pytest.raises(APIError) as missing:
        registry.resolve("other:a", served)
    assert missing.value.status == 404

    metrics = IngressMetrics.__new__(IngressMetrics)  # the label rule alone: no Ray
    metrics._lora_labels = set()
    labels = [metrics.lora_label(f"adapter-{i}") for i in range(MAX_LORA_LABELS + 5)]
    assert labels[:MAX_LORA_LABELS] == [f"adapter-{i}" for i in range(MAX_LORA_LABELS)]
    assert labels[MAX_LORA_LABELS:] == ["other"] * 5 and metrics.lora_label("adapter-0") == \
        "adapter-0"
    with pytest.raises(ValueError, match="unique"):
        AppArgs.parse({"models": [{"name": "m", "model": "smoke:decoder",
                                   "loras": [{"name": "m", "path": "/x"}]}]})
    with pytest.raises(ValueError, match="num_replicas 1"):
        AppArgs.parse({"models": [{"name": "m", "model": "smoke:decoder"}],
                       "http": {"lora_runtime_updates": True, "num_replicas": 2}})
