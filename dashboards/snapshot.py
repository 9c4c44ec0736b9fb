"""Draw the dashboard's main panels from a real Prometheus into one PNG (matplotlib).

    python -m dashboards.snapshot --prometheus http://127.0.0.1:9090 \\
        --out dashboards/packserve_panels.png --minutes 5

Each plot is one or more panels of ``dashboards/packserve.json``, found by id, their
queries rendered as Grafana would (``queries.render``: every variable "All",
``$__rate_interval`` from ``--rate-interval``) and run as range queries over the last
``--minutes``; legends follow the panels' ``legendFormat``. So the picture shows what
the dashboard shows, from the same PromQL.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dashboards import queries


@dataclass(frozen=True)
class Plot:
    title: str
    panel_ids: tuple[int, ...]  # drawn on one axes, in this order
    ylabel: str
    percent: bool = False  # values are fractions: draw them as %


MAIN_PLOTS = (
    Plot("Requests/s by model and HTTP status", (2,), "requests/s"),
    Plot("Time to first token, p50 / p99", (9,), "seconds"),
    Plot("Real tokens/s vs padding avoided/s", (16, 17), "tokens/s"),
    Plot("Bin fill ratio (real tokens / budget)", (19,), "fill", percent=True),
    Plot("Admission pool: reserved vs capacity", (30,), "tokens"),
    Plot("Rejections/s by reason", (33,), "requests/s"),
)
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Prometheus' ``matrix`` result: [{metric, values: [[t, "v"], ...]}, ...]."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as r:
        data = json.loads(r.read())
    if data.get("status") != "success":
        raise RuntimeError(f"query_range {expr!r} failed: {data}")
    return data["data"]["result"]


def panel_targets(dashboard: dict, panel_id: int) -> tuple[str, list[dict]]:
    for panel in queries.iter_panels(dashboard):
        if panel.get("id") == panel_id:
            return panel["title"], panel["targets"]
    raise KeyError(f"no panel with id {panel_id} in the dashboard")


def legend(fmt: str, labels: dict, title: str, multi: bool) -> str:
    text = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt or "").strip()
    return f"{title}: {text}" if multi else text or title


def series_of(url: str, dashboard: dict, plot: Plot, start: float, end: float, step: float,
              rate_interval: str) -> list[tuple[str, list[float], list[float]]]:
    """(legend, times, values) of every series of ``plot``'s panels."""
    out = []
    for panel_id in plot.panel_ids:
        title, targets = panel_targets(dashboard, panel_id)
        for target in targets:
            expr = queries.render(target["expr"], __rate_interval=rate_interval)
            for s in query_range(url, expr, start, end, step):
                name = legend(target.get("legendFormat", ""), s["metric"], title,
                              len(plot.panel_ids) > 1)
                out.append((name, [float(t) for t, _ in s["values"]],
                            [float(v) for _, v in s["values"]]))
    return sorted(out, key=lambda s: s[0])


def draw(url: str, out: Path, minutes: float = 5.0, step: float = 2.0,
         rate_interval: str = "1m", end: float | None = None) -> Path:
    """Query the main panels over ``minutes`` before ``end`` (now) and write the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    dashboard = queries.load()
    end = time.time() if end is None else end
    start = end - minutes * 60
    fig, axes = plt.subplots(3, 2, figsize=(14, 11), dpi=110, sharex=True)
    for ax, plot in zip(axes.flat, MAIN_PLOTS):
        lines = series_of(url, dashboard, plot, start, end, step, rate_interval)
        for name, ts, vs in lines:
            ax.plot([t - end for t in ts], vs, label=name, linewidth=1.6)
        ax.set_title(plot.title, fontsize=11)
        ax.set_ylabel(plot.ylabel)
        ax.grid(alpha=0.3)
        if plot.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if lines:
            ax.legend(fontsize=8, loc="upper left")
            top = max((v for _, _, vs in lines for v in vs if math.isfinite(v)), default=0)
            ax.set_ylim(bottom=0, top=1.05 if plot.percent else None)
            if top == 0 and not plot.percent:
                ax.set_ylim(0, 1)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")
    for ax in axes[-1]:
        ax.set_xlabel("seconds before the snapshot")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
    fig.suptitle(f"packserve: main dashboard panels from Prometheus ({stamp}; rate window "
                 f"{rate_interval}, step {step:g} s)", fontsize=13)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True, help="Prometheus base URL")
    p.add_argument("--out", default="dashboards/packserve_panels.png")
    p.add_argument("--minutes", type=float, default=5.0, help="time range, ending now")
    p.add_argument("--step", type=float, default=2.0, help="seconds between points")
    p.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    args = p.parse_args(argv)
    path = draw(args.prometheus.rstrip("/"), Path(args.out), args.minutes, args.step,
                args.rate_interval)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
