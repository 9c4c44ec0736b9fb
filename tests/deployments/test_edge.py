"""The serving edge, as a new user and as a hostile client would try it, on the session's
shared app (real Ray Serve, a real HTTP server; the official ``openai`` client, or raw
``httpx`` where the client cannot express the body): every bad input is a 4xx in
OpenAI's error body naming the field (and the limit and the value where there is one),
never a 500; a stream asked for is a stream; a client that leaves is a 499."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.deployments.conftest import EMBED, GEN, KEY, MAX_PROMPT_CHARS

HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client(shared_url):
    return openai.OpenAI(base_url=f"{shared_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, path: str, body=None, *, raw: bytes | None = None,
         timeout=120) -> httpx.Response:
    headers = {**HEADERS, "Content-Type": "application/json"}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=timeout)


def openai_error(r: httpx.Response, status: int, param: str | None, *needles: str) -> dict:
    """The response is ``status`` with OpenAI's error body, naming ``param`` and each needle."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["param"] == param, err
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])
    return err


# ---- each hole of issue 13, as it was observed ---------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_seed_beyond_63_bits_is_a_400_naming_the_range(shared_url, stream):
    body = {"model": GEN, "prompt": "hi", "max_tokens": 2, "seed": 2**64, "stream": stream}
    openai_error(post(shared_url, "/v1/completions", body), 400, "seed",
                 "seed", str(2**63 - 1), str(2**64))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": GEN, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/embeddings", {"model": EMBED, "input": ["ok", "a\ud800b"]}, "input[1]"),
    ("/v1/chat/completions", {"model": GEN, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]},
     "messages[0].content[0].text"),
])
def test_a_lone_surrogate_is_refused_at_the_edge(shared_url, path, body, param):
    raw = json.dumps(body).encode()  # json.dumps escapes it: "a\\ud800b", valid JSON
    assert b"\\ud800" in raw or b"\\udfff" in raw
    openai_error(post(shared_url, path, raw=raw), 400, param, "lone surrogate")


def test_more_embedding_inputs_than_the_limit_is_a_400_naming_limit_value_setting(shared_url):
    body = {"model": EMBED, "input": ["a"] * 2049}
    openai_error(post(shared_url, "/v1/embeddings", body), 400, "input",
                 "2049", "2048", "http.max_embedding_inputs")


def test_a_prompt_over_the_character_cap_is_refused_before_tokenizing(shared_url):
    n = MAX_PROMPT_CHARS + 1
    openai_error(post(shared_url, "/v1/completions", {"model": GEN, "prompt": "x" * n}), 400,
                 "prompt", str(n), str(MAX_PROMPT_CHARS), "http.max_prompt_chars")
    openai_error(post(shared_url, "/v1/embeddings", {"model": EMBED, "input": ["x" * n]}), 400,
                 "input", "http.max_prompt_chars")


def test_body_errors_and_unknown_routes_use_openais_error_body(shared_url):
    limit = 4 << 20

    def chunks():  # no Content-Length: the limit is found while counting
        for _ in range(5):
            yield b"x" * (1 << 20)

    r = httpx.post(f"{shared_url}/v1/completions", content=chunks(), timeout=120,
                   headers={**HEADERS, "Content-Type": "application/json"})
    openai_error(r, 413, "body", str(limit), "http.max_body_bytes", "chunks")
    openai_error(post(shared_url, "/v1/completions", raw=b'{"model": "\xff\xfe"}'), 400, "body",
                 "not valid UTF-8", "0xff")
    r = httpx.get(f"{shared_url}/v1/nothing-here", headers=HEADERS, timeout=30)
    openai_error(r, 404, None, "/v1/nothing-here")
    r = httpx.get(f"{shared_url}/v1/completions", headers=HEADERS, timeout=30)
    err = openai_error(r, 405, None, "GET", "POST")
    assert err["code"] == "method_not_allowed" and r.headers["allow"] == "POST"


@pytest.mark.parametrize("body,param,needles", [
    ({"model": GEN, "prompt": "hi", "max_tokens": True}, "max_tokens", ["integer", "True"]),
    ({"model": GEN, "prompt": [True, False]}, "prompt", ["token ids", "[True, False]"]),
    ({"model": GEN, "prompt": "hi", "temperature": "1"}, "temperature", ["number", "'1'"]),
    ({"model": GEN, "prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options", ["stream: true"]),
])
def test_json_types_are_strict(shared_url, body, param, needles):
    openai_error(post(shared_url, "/v1/completions", body), 400, param, *needles)


@pytest.mark.parametrize("messages,extra,param,needles", [
    ([{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}], {},
     "messages[0].content", ["text must be a string", "{'a': 1}"]),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {},
     "messages[0].content", ["only text parts", "image_url"]),
    ([{"role": "user", "content": "hi"}], {"top_logprobs": 2}, "top_logprobs",
     ["top_logprobs=2", "logprobs: true"]),
])
def test_chat_fields_are_strict(shared_url, messages, extra, param, needles):
    body = {"model": GEN, "messages": messages, **extra}
    openai_error(post(shared_url, "/v1/chat/completions", body), 400, param, *needles)


def test_a_too_long_chat_names_what_the_client_sent_and_the_default(shared_url, client):
    long = [{"role": "user", "content": "word " * 800}]
    err = openai_error(post(shared_url, "/v1/chat/completions", {"model": GEN, "messages": long}),
                       400, "messages", "max_model_len=512", "max_tokens was not sent")
    assert "max_tokens 1" not in err["message"]
    short = [{"role": "user", "content": "word " * 300}]
    err = openai_error(post(shared_url, "/v1/chat/completions",
                            {"model": GEN, "messages": short, "max_tokens": 400}),
                       400, "max_tokens", "max_tokens 400", "max_model_len=512")
    with pytest.raises(openai.BadRequestError, match="max_tokens was not sent"):
        client.chat.completions.create(model=GEN, messages=long)


def test_stream_with_echo_and_no_new_tokens_streams_the_scores(client):
    whole = client.completions.create(model=GEN, prompt="Once upon", max_tokens=0, echo=True,
                                      logprobs=0)
    chunks = list(client.completions.create(model=GEN, prompt="Once upon", max_tokens=0,
                                            echo=True, logprobs=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in texts) == whole.choices[0].text == "Once upon"
    assert texts[-1].finish_reason == "length"
    assert texts[0].logprobs.token_logprobs == whole.choices[0].logprobs.token_logprobs
    assert chunks[-1].usage.completion_tokens == 0


# ---- what the operator sees ----------------------------------------------------------

def node_metrics(name: str, **labels: str) -> list[float]:
    """Values of a series on the Ray node's metrics endpoint whose labels include these."""
    import ray

    node = ray.nodes()[0]
    text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=30).text
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and all(w in line for w in want)]


def eventually(fn, timeout_s: float = 60.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def serve_logs(pattern: str) -> str:
    """Every Serve replica log line of this Ray session that contains ``pattern``."""
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(line for path in sorted(logs.glob("replica_*.log"))
                   for line in path.read_text(errors="replace").splitlines(keepends=True)
                   if pattern in line)


def test_a_client_that_drops_a_request_is_counted_as_499(shared_url):
    body = {"model": GEN, "prompt": "leave early", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(shared_url, "/v1/completions", body, timeout=httpx.Timeout(120, read=0.5))
    labels = {"model": GEN, "endpoint": "completions"}
    assert eventually(lambda: node_metrics("ray_packserve_requests_total", status="499",
                                           **labels))
    assert not node_metrics("ray_packserve_requests_total", status="500", **labels)


def test_a_client_error_logs_one_warning_line_and_no_traceback(shared_url):
    marker = 4000 + 96  # an id just past the smoke model's 4,096-token vocabulary
    openai_error(post(shared_url, "/v1/completions", {"model": GEN, "prompt": [5, marker]}),
                 400, "prompt", str(marker), "vocabulary")
    assert eventually(lambda: serve_logs(f"token id {marker}"))
    lines = serve_logs(f"token id {marker}")
    assert "WARNING" in lines and "Traceback" not in serve_logs("Traceback")
    assert "Request failed." not in serve_logs("Request failed.")


def test_heartbeats_leave_no_access_log_and_counters_start_at_zero(shared_url):
    import time

    time.sleep(2.5)  # a few heartbeats (admission.heartbeat_s = 1)
    for method in ("replica_report", "holder_report", "record_routing_stats"):
        assert not serve_logs(f"CALL {method}"), serve_logs(f"CALL {method}")[:500]
    zero = {"model": GEN}
    for name in ("ray_packserve_oom_events_total", "ray_packserve_budget_shrinks_total",
                 "ray_packserve_preemptions_total", "ray_packserve_rejections_total"):
        values = eventually(lambda n=name: node_metrics(n, **zero))
        assert values and min(values) == 0.0, (name, values)
