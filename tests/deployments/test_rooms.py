"""The deployments/ rooms keep their boundaries: the HTTP edge validates bodies without
torch, and the route table is the one list of what is served and metered."""

import subprocess
import sys

from deployments.http import ingress, request_timer, routes


def test_the_edge_imports_no_torch():
    code = ("import sys; import deployments.http.ingress, deployments.http.protocol, "
            "deployments.http.openai_api, deployments.http.classify_api, worker.params; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"the edge imported {out}"


def test_every_route_is_mounted_once_and_every_endpoint_is_metered():
    mounted = {(path, method.upper()) for path, ops in ingress.app.openapi()["paths"].items()
               for method in ops}
    table = {(p.replace(":path}", "}"), r.method) for r in routes.ROUTES for p in r.paths}
    assert table <= mounted
    assert mounted - table == set(), "a route served outside the table"
    for r in routes.ROUTES:
        for p in r.paths:
            assert request_timer.ENDPOINTS.get(p) == r.endpoint
    assert "/health" in routes.OPEN_PATHS and "/v1/chat/completions" not in routes.OPEN_PATHS


def test_a_row_without_a_handler_is_refused_at_import():
    class NoHandlers:
        pass

    try:
        routes.mount(ingress.FastAPI(), NoHandlers)
    except TypeError as exc:
        assert "has no handler 'health'" in str(exc)
    else:
        raise AssertionError("mount accepted a class without handlers")
