"""A model whose checkpoint has no tokenizer: every request that needs text gets a 400
naming the model and the loader's reason (not a 500), and the load is not retried per
request. Without Ray: the ingress's service object alone."""

from __future__ import annotations

import asyncio

import pytest

from deployments.app.config import AppArgs
from deployments.http.errors import APIError
from deployments.http.openai_api import OpenAIService


def test_a_model_without_a_tokenizer_is_a_400(tiny_model, monkeypatch):
    import deployments.http.served as api

    args = AppArgs.parse({"models": [{"name": "bare", "model": str(tiny_model("llama"))}],
                          "http": {"stream_transport": "serve_handle"}})
    service = OpenAIService(args, {"bare": object()}, admission=None)
    loads = []
    real = api.ModelTokenizer

    def counting(*a, **k):
        loads.append(a)
        return real(*a, **k)

    monkeypatch.setattr(api, "ModelTokenizer", counting)

    async def twice():
        errors = []
        for _ in range(2):
            with pytest.raises(APIError) as info:
                await service.model("bare").tokenizer()
            errors.append(info.value)
        return errors

    errors = asyncio.run(twice())
    for err in errors:
        assert err.status == 400 and err.param == "model"
        assert "'bare' has no tokenizer" in err.message
    assert len(loads) == 1  # the failure is remembered, not retried per request
