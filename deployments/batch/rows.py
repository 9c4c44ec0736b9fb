"""Bad rows: why an input row produced no output, and the per-row checks that say so.

A bad row never stops the job: it is written to the errors file (one JSON object per
line, see ``BadRow.to_json``) and the rest of its shard goes on. Row numbers are 0-based
positions in the input (for JSONL, the line number minus one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from worker.core.errors import RequestOutOfMemoryError, SequenceTooLongError


class ErrorKind(enum.StrEnum):
    EMPTY_ROW = "empty_row"  # a blank line
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"  # valid JSON, but not {...}
    MISSING_ID = "missing_id"
    INVALID_ID = "invalid_id"  # not a string or an integer, or not the job's id type
    DUPLICATE_ID = "duplicate_id"  # the first row with an id wins; later ones are bad
    MISSING_TEXT = "missing_text"
    INVALID_TEXT = "invalid_text"  # not a string
    EMPTY_TEXT = "empty_text"  # "" or whitespace only
    TOO_LONG = "too_long"  # over max_model_len or the token budget (the engine's check)
    INVALID_REQUEST = "invalid_request"  # any other InvalidRequestError of the engine
    OUT_OF_MEMORY = "out_of_memory"  # the document alone ran the device out of memory


@dataclass(frozen=True)
class BadRow:
    """One row without output. ``limit``/``value``/``setting`` as in ``worker.core.errors``."""

    row: int
    id: str | int | None  # None when the row has no usable id
    kind: ErrorKind
    reason: str
    limit: object = None
    value: object = None
    setting: str | None = None

    def to_json(self) -> dict:
        return {"row": self.row, "id": self.id, "kind": str(self.kind), "reason": self.reason,
                "limit": self.limit, "value": _plain(self.value), "setting": self.setting}

    @classmethod
    def from_json(cls, d: dict) -> BadRow:
        return cls(d["row"], d["id"], ErrorKind(d["kind"]), d["reason"], d.get("limit"),
                   d.get("value"), d.get("setting"))

    @classmethod
    def from_error(cls, row: int, id_, exc: BaseException) -> BadRow:
        """From the engine's typed error (``InvalidRequestError`` or out of memory)."""
        if isinstance(exc, SequenceTooLongError):
            kind = ErrorKind.TOO_LONG
        elif isinstance(exc, RequestOutOfMemoryError):
            kind = ErrorKind.OUT_OF_MEMORY
        else:
            kind = ErrorKind.INVALID_REQUEST
        return cls(row, id_, kind, str(exc), _plain(getattr(exc, "limit", None)),
                   _plain(getattr(exc, "value", None)), getattr(exc, "setting", None))


class IdChecker:
    """Row ids, in input order: a string or an integer, every row the same type as the
    first good one, each id once (the first row with it wins). ``id_field == ""`` keys
    rows by their row number instead."""

    def __init__(self, id_field: str):
        self.id_field = id_field
        self.id_type: type | None = int if not id_field else None
        self._first_row: dict = {}

    def check(self, row: int, record: dict) -> BadRow | None:
        """None when ``record``'s id is good (it is then taken)."""
        if not self.id_field:
            return None
        field = self.id_field
        id_ = record.get(field)
        if id_ is None:
            return BadRow(row, None, ErrorKind.MISSING_ID, f"the row has no {field!r} field "
                          "(set --id-field, or --id-field '' to key rows by row number)",
                          setting="--id-field")
        if isinstance(id_, bool) or not isinstance(id_, (str, int)):
            return BadRow(row, None, ErrorKind.INVALID_ID, f"the id field {field!r} must be a "
                          f"string or an integer, got {type(id_).__name__}", value=repr(id_)[:80])
        if self.id_type is None:
            self.id_type = type(id_)
        if not isinstance(id_, self.id_type):
            return BadRow(row, None, ErrorKind.INVALID_ID, f"the id {id_!r} is a "
                          f"{type(id_).__name__}; this job's ids are {self.id_type.__name__}s "
                          "(the type of the first row's id)", value=id_)
        first = self._first_row.setdefault(id_, row)
        if first != row:
            return BadRow(row, id_, ErrorKind.DUPLICATE_ID,
                          f"the id {id_!r} is already taken by row {first}", value=id_)
        return None


def check_text(row: int, id_, record: dict, text_field: str) -> BadRow | None:
    """None when ``record[text_field]`` is a non-blank string."""
    text = record.get(text_field)
    if text is None:
        return BadRow(row, id_, ErrorKind.MISSING_TEXT,
                      f"the row has no {text_field!r} field (or it is null)", setting="--text-field")
    if not isinstance(text, str):
        return BadRow(row, id_, ErrorKind.INVALID_TEXT, f"the text field {text_field!r} must be "
                      f"a string, got {type(text).__name__}", setting="--text-field")
    if not text.strip():
        return BadRow(row, id_, ErrorKind.EMPTY_TEXT, f"the text field {text_field!r} is empty "
                      f"({len(text)} characters, all whitespace)", limit=1, value=0)
    return None


def _plain(value):
    """JSON-friendly: numpy scalars and tuples become Python numbers and lists."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value
