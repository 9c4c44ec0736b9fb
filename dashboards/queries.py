"""Read the dashboard: its panels, every PromQL expression, the metrics each names.

The tests use it to check that every series the dashboard queries is declared in
``deployments/app/metrics.py`` (or is one of Ray Serve's standard series), and to run every
query against a real Prometheus (``render`` fills in Grafana's variables,
``as_promql`` turns a ``label_values`` variable query into plain PromQL).

The metric-name scan is deliberately small, not a PromQL parser: it drops string
literals, label matchers ``{...}``, range selectors ``[...]``, grouping clauses
(``by (...)``, ``on (...)``, ...), offsets, numbers and Grafana variables; what is left and is
not a function call or a keyword is a metric name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DASHBOARD = Path(__file__).with_name("packserve.json")
GRAFANA_DEFAULTS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_OFFSETS = re.compile(r"\boffset\s+-?[\w$]+")
_NUMBERS = re.compile(r"\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b")
_VARIABLES = re.compile(r"\$\{?(\w+)\}?")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*$", re.DOTALL)
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right",
                       "bool", "offset", "and", "or", "unless", "inf", "nan"})


@dataclass(frozen=True)
class Query:
    """One query of the dashboard: a panel target, or a template variable's query."""

    panel_id: int | None  # None for a template variable
    title: str  # the panel's title, or the variable's name
    ref: str  # the target's refId, or the variable's name
    expr: str


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows included, and panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict) -> list[Query]:
    """Every panel target's expression, then every query variable's query."""
    out = [Query(p.get("id"), p.get("title", ""), t.get("refId", ""), t["expr"])
           for p in iter_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            out.append(Query(None, var["name"], var["name"],
                             q["query"] if isinstance(q, dict) else q))
    return out


def _strip(expr: str) -> str:
    """``expr`` with strings, matchers, ranges, grouping clauses, numbers and Grafana
    variables removed (what remains: names, functions, operators)."""
    expr = _STRINGS.sub('""', expr)
    expr = _SELECTOR.sub(lambda m: m.group(1) or "", expr)
    expr = _RANGES.sub("", expr)
    expr = _GROUPING.sub("", expr)
    expr = _OFFSETS.sub("", expr)
    expr = _VARIABLES.sub("", expr)
    return _NUMBERS.sub("", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (a ``label_values`` query: its metric)."""
    m = _LABEL_VALUES.match(expr)
    if m:
        expr = m.group(1)
    stripped = _strip(expr)
    names = set()
    for match in _IDENT.finditer(stripped):
        name, rest = match.group(), stripped[match.end():].lstrip()
        if name not in _KEYWORDS and not rest.startswith("("):
            names.add(name)
    return names


def selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """(metric, label names its matchers use) for every ``metric{...}`` in ``expr``."""
    expr = _STRINGS.sub('""', expr)
    return [(m.group(1), frozenset(_MATCHER_LABEL.findall(m.group(2))))
            for m in _SELECTOR.finditer(expr) if m.group(1)]


def grouping_labels(expr: str) -> set[str]:
    """Label names in ``by (...)``, ``without (...)``, ``on (...)`` clauses."""
    expr = _STRINGS.sub('""', expr)
    return {label.strip() for m in _GROUPING.finditer(expr)
            for label in m.group(2).split(",") if label.strip()}


def render(expr: str, **variables: str) -> str:
    """``expr`` with Grafana's variables filled in: ``$__rate_interval`` and friends from
    ``GRAFANA_DEFAULTS``, every other variable ``.*`` (the dashboard's "All"), unless
    given in ``variables``."""
    values = {**GRAFANA_DEFAULTS, **variables}
    return _VARIABLES.sub(lambda m: values.get(m.group(1), ".*"), expr)


def as_promql(expr: str) -> str:
    """A ``label_values(selector, label)`` variable query as PromQL that returns one
    series per value; any other expression unchanged."""
    m = _LABEL_VALUES.match(expr)
    return f"count by ({m.group(2)}) ({m.group(1)})" if m else expr
