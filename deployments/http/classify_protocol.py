"""Request bodies of the classification endpoints, validated at the edge by the rules of
``deployments/http/protocol.py`` (unknown fields refused, strict JSON types, lone surrogates
refused with their path).

| endpoint                         | shape of                                                   |
|----------------------------------|------------------------------------------------------------|
| ``POST /v1/classify``            | vLLM's: ``input`` string(s) or token ids                   |
| ``POST /v1/rerank`` (+ ``/rerank``, ``/v2/rerank``) | Cohere's and Jina's, as vLLM and TEI accept: ``query``, ``documents``, ``top_n``, ``return_documents`` |
| ``POST /v1/score`` (+ ``/score``) | vLLM's: ``text_1`` against ``text_2`` (one against many, or pairwise) |
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from deployments.http.protocol import TokenIds, _Body, _inputs


class ClassifyRequest(_Body):
    """POST /v1/classify: one label and its probabilities per input."""

    input: Annotated[list[str] | list[TokenIds], PlainValidator(
        _inputs, json_schema_input_type=str | list[str] | TokenIds | list[TokenIds])]


class RerankDocument(BaseModel):
    """A document as an object (Jina's and Cohere's v1 form); a plain string is the same."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str


class RerankRequest(_Body):
    """POST /v1/rerank: ``documents`` sorted by relevance to ``query``."""

    query: str
    documents: list[str | RerankDocument] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0)  # None or 0: every document
    return_documents: bool = True  # each result carries {"text": ...} (vLLM, Jina)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(_Body):
    """POST /v1/score: ``text_1[i]`` against ``text_2[i]``; one ``text_1`` is scored
    against every ``text_2`` (vLLM's rule)."""

    text_1: str | list[str]
    text_2: str | list[str]

    def pairs(self) -> tuple[list[str], list[str]]:
        """(firsts, seconds) of equal length; ``ValueError`` naming both lengths."""
        first = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        second = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        if not first or not second:
            empty = "text_1" if not first else "text_2"
            raise ValueError(f"{empty} is empty: send a string or a non-empty list of strings")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise ValueError(f"text_1 has {len(first)} texts and text_2 has {len(second)}: send "
                             "one text_1 (scored against every text_2) or lists of equal length")
        return first, second
