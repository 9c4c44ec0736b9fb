"""A request's stop strings, matched where its text grew instead of rescanned.

A stop string that appears in the text must end in what was added since the last check
(everything before was checked then, and did not match), so a check looks only at the
new characters' end positions, against the distinct lengths of the stop strings::

    for end in (last checked end - BACKOFF, len(text)]:      # the new characters
        for L in distinct stop lengths (ascending):
            text[end - L:end] in the set of stop strings ?   # one hash lookup

That is O(new characters x distinct lengths) per step, whatever the number of strings:
a request with 10,000 stop strings costs the step what one with ten does (the rescan it
replaces did ``text.find(s)`` for every string over the whole text, every token).
``BACKOFF`` characters before the last check are looked at again because a detokenizer
may rewrite the tail of the text when a token arrives (a partial UTF-8 character
completed, a space cleaned up before punctuation).

Streaming holds back a tail that may still grow into a stop string (``settled``): the
longest suffix (shorter than the longest stop string) that begins some stop string,
found in a set of every stop string's prefixes (built on the first streamed step).
"""

from __future__ import annotations

BACKOFF = 4  # characters before the last checked end that are checked again


class StopStrings:
    """The stop strings of one sequence and how far its text has been checked."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = frozenset(s for s in stops if s)
        self.lengths = sorted({len(s) for s in self.stops})
        self.longest = self.lengths[-1] if self.lengths else 0
        self.checked = 0  # text[:checked] holds no stop string
        self._prefixes: frozenset[str] | None = None

    def find(self, text: str) -> int | None:
        """Where the earliest stop string in ``text`` starts, or None; only matches that
        end after the previous call's text are looked for."""
        best = None
        for end in range(max(1, self.checked - BACKOFF + 1), len(text) + 1):
            for length in self.lengths:  # ascending: start moves left
                start = end - length
                if start < 0:
                    break
                if (best is None or start < best) and text[start:end] in self.stops:
                    best = start
        self.checked = len(text.rstrip("\ufffd"))
        return best

    def prefixes(self) -> frozenset[str]:
        """Every prefix of every stop string, built on first use (10,000 strings: about
        28 ms, so a stream builds it before its sequence reaches the step thread)."""
        if self._prefixes is None:
            self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s) + 1))
        return self._prefixes

    def settled(self, text: str) -> str:
        """``text`` without an incomplete UTF-8 character at its end and without a tail
        that may still grow into a stop string (what a stream can send now)."""
        text = text.rstrip("\ufffd")
        if self.longest < 2:
            return text
        prefixes = self.prefixes()
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            if text[-k:] in prefixes:
                return text[:-k]
        return text
