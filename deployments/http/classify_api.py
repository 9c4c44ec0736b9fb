"""The classification endpoints' logic: classify, rerank and score. Validate, tokenize,
admit, route, format, as ``OpenAIService`` does for the OpenAI endpoints (whose model
lookups, tokenizers, admission client and replica calls this reuses).

| endpoint      | served by                                          | a replica runs          |
|---------------|----------------------------------------------------|-------------------------|
| ``classify``  | sequence classifiers                               | ``classify`` (logits)   |
| ``rerank``,   | cross-encoders (one-label classifiers): sigmoid of | ``classify`` over the   |
| ``score``     | the pair's logit                                   | (query, document) pairs |
|               | embedding models (no cross-encoder): cosine        | ``embed`` of the query  |
|               | similarity of the two texts' embeddings            | and documents, once     |

Pairs are tokenized as the model's tokenizer joins them (``tokenizer(query, document)``:
``[CLS] q [SEP] d [SEP]`` with token types for BERT, ``<s> q </s></s> d </s>`` for
RoBERTa, plain concatenation for decoders). Admission leases every token the replica
will run (all pairs; or the query once plus the documents), clamped to one replica as
for embeddings. Limits, each a 400 naming it: inputs per request, every sequence within
``max_model_len``, a model that can serve the endpoint.
"""

from __future__ import annotations

import time

import numpy as np

from deployments.http.classify_protocol import ClassifyRequest, RerankRequest, ScoreRequest
from deployments.http.errors import bad_request
from deployments.http.limits import check_chars, check_length, check_vocab
from deployments.http.openai_api import OpenAIService
from deployments.http.request_timer import UNTIMED, RequestTimer
from deployments.http.responses import new_id
from deployments.replica.work import ClassifyWork, EmbedWork, ModelInfo



class ClassifyService:
    def __init__(self, service: OpenAIService):
        self.service = service

    # ---- endpoints ------------------------------------------------------------------

    async def classify(self, body: ClassifyRequest, timer: RequestTimer = UNTIMED) -> dict:
        info = await self._model(body.model)
        if not info.is_classifier:
            raise bad_request(f"{body.model!r} is not a sequence classifier (it serves "
                              f"{', '.join(info.tasks)}); /v1/classify needs an "
                              "*ForSequenceClassification model", param="model")
        raw = body.input
        self._check_count(len(raw), "input")
        if isinstance(raw[0], str):
            tok = await self.service.model(body.model).tokenizer()
            inputs = await self._tokenize(sum(len(x) for x in raw), "input",
                                          tok.encode_batch, raw)
        else:
            for i, ids in enumerate(raw):
                check_vocab(info, ids, f"input[{i}]")
            inputs = raw
        for i, ids in enumerate(inputs):
            check_length(info, len(ids), 0, f"input[{i}]")
        logits, total = await self._classify(body.model, inputs, None, timer)
        probs = info.labels.probabilities(logits)
        data = [{"index": i, "label": label, "probs": row.tolist(),
                 "num_classes": info.labels.num_labels}
                for i, (label, row) in enumerate(zip(info.labels.top_labels(probs), probs))]
        return {"id": new_id("classify"), "object": "list", "created": int(time.time()),
                "model": body.model, "data": data, "usage": _usage(total)}

    async def rerank(self, body: RerankRequest, timer: RequestTimer = UNTIMED) -> dict:
        info = await self._relevance_model(body.model, "rerank")
        docs = body.texts()
        self._check_count(len(docs), "documents")
        scores, total = await self._relevance(body.model, info, [body.query] * len(docs), docs,
                                              ("query", "documents"), timer)
        order = np.argsort(-scores, kind="stable")[: body.top_n or len(docs)]
        results = []
        for i in order:
            result = {"index": int(i), "relevance_score": float(scores[i])}
            if body.return_documents:
                result["document"] = {"text": docs[i]}
            results.append(result)
        return {"id": new_id("rerank"), "model": body.model, "results": results,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    async def score(self, body: ScoreRequest, timer: RequestTimer = UNTIMED) -> dict:
        info = await self._relevance_model(body.model, "score")
        try:
            first, second = body.pairs()
        except ValueError as exc:
            raise bad_request(str(exc), param="text_2") from None
        self._check_count(len(second), "text_2")
        scores, total = await self._relevance(body.model, info, first, second,
                                              ("text_1", "text_2"), timer)
        data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
        return {"id": new_id("score"), "object": "list", "created": int(time.time()),
                "model": body.model, "data": data, "usage": _usage(total)}

    # ---- relevance of pairs -----------------------------------------------------------

    async def _relevance(self, model: str, info: ModelInfo, first: list[str],
                         second: list[str], fields: tuple[str, str],
                         timer) -> tuple[np.ndarray, int]:
        """(one score per pair, tokens run): a cross-encoder's sigmoid, else cosine.
        ``fields`` name the two sides in errors (``("query", "documents")``)."""
        tok = await self.service.model(model).tokenizer()
        chars = sum(map(len, second)) + sum(map(len, dict.fromkeys(first)))
        if info.is_classifier:
            ids, types = await self._tokenize(chars, fields[1], _encode_pairs, tok.tokenizer,
                                              first, second)
            for i, seq in enumerate(ids):
                check_length(info, len(seq), 0, f"the pair ({fields[0]}, {fields[1]}[{i}])")
            logits, total = await self._classify(model, ids, types, timer)
            return info.labels.probabilities(logits)[:, 0], total
        distinct = list(dict.fromkeys(first))  # each first text embedded once
        ids = await self._tokenize(chars, fields[1], tok.encode_batch, distinct + second)
        for i, seq in enumerate(ids):
            where = fields[0] if i < len(distinct) else f"{fields[1]}[{i - len(distinct)}]"
            check_length(info, len(seq), 0, where)
        vectors, total = await self._embed(model, ids, timer)
        row = {t: i for i, t in enumerate(distinct)}
        firsts = vectors[[row[t] for t in first]]
        return np.einsum("ij,ij->i", firsts, vectors[len(distinct):]), total

    # ---- replica calls ----------------------------------------------------------------

    async def _classify(self, model: str, inputs: list[list[int]], types, timer):
        total = sum(len(ids) for ids in inputs)
        lease = await self.service.admission.reserve(model, total, clamp=True)
        try:
            logits = await self.service._call(
                self.service.model(model).handle.classify,
                ClassifyWork(lease.lease_id, lease.tokens, inputs, types), timer)
        finally:
            lease.release()
        return np.asarray(logits, np.float32), total

    async def _embed(self, model: str, inputs: list[list[int]], timer):
        """Unit vectors (whatever the model's ``normalize``), with its pooling."""
        total = sum(len(ids) for ids in inputs)
        pooling = self.service.args.model(model).pooling
        lease = await self.service.admission.reserve(model, total, clamp=True)
        try:
            vectors = await self.service._call(
                self.service.model(model).handle.embed,
                EmbedWork(lease.lease_id, lease.tokens, inputs, pooling, True), timer)
        finally:
            lease.release()
        return np.asarray(vectors, np.float32), total

    # ---- checks -----------------------------------------------------------------------

    async def _tokenize(self, num_chars: int, field: str, fn, *args):
        """``fn(*args)`` on the ingress's tokenizer pool (off the event loop when large),
        after the per-request character cap (``http.max_prompt_chars``)."""
        check_chars(num_chars, self.service.limits.max_prompt_chars, field)
        return await self.service.pool.run(num_chars, fn, *args)

    async def _model(self, name: str) -> ModelInfo:
        return await self.service.model(name).info()  # 404 for a model that is not served

    async def _relevance_model(self, name: str, endpoint: str) -> ModelInfo:
        info = await self._model(name)
        if info.can_rerank:
            return info
        if info.is_classifier:
            why = (f"is a classifier of {info.labels.num_labels} labels "
                   f"({', '.join(info.labels.labels)}); {endpoint} needs one label per pair "
                   "(a cross-encoder, num_labels=1)")
        else:
            why = "is a generative model"
        raise bad_request(f"{name!r} {why}. /v1/{endpoint} is served by cross-encoders and by "
                          "embedding models (cosine similarity)", param="model")

    def _check_count(self, num: int, field: str) -> None:
        limit, setting = self.service.limits.max_embedding_inputs, "http.max_embedding_inputs"
        if num == 0:
            raise bad_request(f"{field} is empty: send at least one", param=field)
        if num > limit:
            raise bad_request(f"{field} has {num} items, more than the limit of {limit} per "
                              f"request ({setting}); split it into several requests",
                              param=field)


def _encode_pairs(tokenizer, first: list[str], second: list[str]):
    """Token ids of each pair as the model's tokenizer joins them, and their token types
    when the tokenizer makes any nonzero (BERT); else None."""
    enc = tokenizer(first, second, add_special_tokens=True)
    ids = [list(x) for x in enc["input_ids"]]
    types = enc.get("token_type_ids")
    if types is None or not any(any(t) for t in types):
        return ids, None
    return ids, [list(t) for t in types]


def _usage(total: int) -> dict:
    return {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0}
