"""What ``p2plb bench`` reports: results, the rich tables and the plots.

Rules of this module:

* Results are frozen dataclasses that turn into JSON as they are
  (``BenchReport.to_json``); latencies are in milliseconds, shares are
  fractions of the requests all indexers served during a contender's run.
* The figure of merit is a ratio from one run: a contender's p99 over
  HAProxy leastconn's (``ScenarioResult.ratio``).  The tables show it next to
  the absolute figures, which move with whatever else the machine does.
* matplotlib is optional (``pip install 'p2plb[bench]'``) and imported only
  by ``plot``, which says how to get it when it is missing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

from p2plb.errors import UsageError

__all__ = [
    "AIMS",
    "REFERENCE",
    "BenchReport",
    "ContenderResult",
    "IndexerShare",
    "ScenarioResult",
    "machine",
    "plot",
    "render",
    "require_matplotlib",
]

REFERENCE = "haproxy/leastconn"

# -- results -----------------------------------------------------------------------


@dataclass(frozen=True)
class IndexerShare:
    id: str
    capacity: int
    served: int
    share: float  # of the requests all indexers served in the run
    capacity_share: float  # its capacity over the total: the fair share
    peak_load: int  # most requests serving plus queued seen at once


@dataclass(frozen=True)
class ContenderResult:
    """One contender's run; latencies in milliseconds."""

    name: str
    requests: int  # measured: due after the warm-up
    errors: int
    throughput: float  # good answers per second over the measured window
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    late_ms: float  # the furthest the generator fell behind its schedule
    others_cpu: float  # CPUs used by processes outside the benchmark
    indexers: tuple[IndexerShare, ...]


@dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    capacities: tuple[int, ...]
    load: float
    rate: float  # requests per second offered
    service_time_ms: float
    antagonist: tuple[float, float] | None
    slow_indexer: str | None
    report_interval: float
    bursts: dict[str, float] | None
    clients: int
    duration: float
    warmup: float
    contenders: tuple[ContenderResult, ...]
    wall_time_s: float

    def result(self, name: str) -> ContenderResult:
        for contender in self.contenders:
            if contender.name == name:
                return contender
        raise KeyError(name)

    def ratio(self, name: str) -> float | None:
        """``name``'s p99 over HAProxy leastconn's, if both ran."""
        try:
            reference = self.result(REFERENCE).p99_ms
            return self.result(name).p99_ms / reference
        except (KeyError, ZeroDivisionError):
            return None


@dataclass(frozen=True)
class BenchReport:
    suite: str
    quick: bool
    seed: int
    machine: dict[str, Any]
    scenarios: tuple[ScenarioResult, ...] = ()
    figures: dict[str, Any] = field(default_factory=dict)  # other suites
    wall_time_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent) + "\n"


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    haproxy = shutil.which("haproxy")
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "haproxy": haproxy,
        "wrk": shutil.which("wrk"),
        "load_average": os.getloadavg(),
    }


# -- output ----------------------------------------------------------------------------


def render(report: BenchReport) -> RenderableType:
    """The report as rich tables."""
    if report.suite != "balancing":
        from p2plb.benchsuites import render_suite

        return render_suite(report.suite, report.figures)
    parts: list[RenderableType] = []
    for result in report.scenarios:
        parts.append(_latency_table(result))
        parts.append(_share_table(result))
        parts.append(_verdict(result))
    return Group(*parts)


# The aims of issue 6 for p2plb's best contender, as a ratio to HAProxy
# leastconn's p99 in the same run.
AIMS = {"steady": 1.0, "antagonist": 0.8}


def _verdict(result: ScenarioResult) -> str:
    """Which p2plb contender had the lowest p99, against HAProxy leastconn's."""
    ours = [c for c in result.contenders if not c.name.startswith("haproxy")]
    if not ours:
        return ""
    best = min(ours, key=lambda c: c.p99_ms)
    ratio = result.ratio(best.name)
    line = (
        f"{result.scenario}: best p2plb contender {best.name}, p99 {best.p99_ms:.1f} ms"
    )
    if ratio is None:
        return line + " (no HAProxy leastconn to compare with)\n"
    line += f" = {ratio:.2f}x HAProxy leastconn"
    aim = AIMS.get(result.scenario)
    if aim is not None:
        met = "[green]met[/]" if ratio <= aim else "[red]missed[/]"
        line += f" (aim <= {aim:g}x: {met})"
    return line + "\n"


def _latency_table(result: ScenarioResult) -> Table:
    slow = ""
    if result.antagonist is not None:
        factor, period = result.antagonist
        slow = f", {result.slow_indexer} {factor:g}x slower every other {period:g} s"
    bursts = ""
    if result.bursts is not None:
        bursts = (
            f", {result.bursts['factor']:g}x bursts {result.bursts['length']:g} s "
            f"in {result.bursts['period']:g} s"
        )
    table = Table(
        title=f"{result.scenario}: capacities {list(result.capacities)}, "
        f"{result.service_time_ms:g} ms mean service, {result.load:.0%} load "
        f"({result.rate:,.0f} req/s){slow}{bursts}",
        caption=f"{result.duration:g} s per contender after {result.warmup:g} s "
        f"warm-up, open-loop Poisson; load reports every "
        f"{result.report_interval:g} s; routed: {result.clients} clients. "
        f"Latency in ms from the scheduled arrival.",
        caption_justify="left",
    )
    columns: tuple[str, ...] = (
        "contender",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "p99 / HAProxy lc",
    )
    columns += ("req/s", "errors", "others' CPU")
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    best = min(
        (c for c in result.contenders if not c.name.startswith("haproxy")),
        key=lambda c: c.p99_ms,
        default=None,
    )
    for c in result.contenders:
        ratio = result.ratio(c.name)
        label = f"[bold]{c.name}[/]" if c is best else c.name
        table.add_row(
            label,
            f"{c.p50_ms:.1f}",
            f"{c.p90_ms:.1f}",
            f"{c.p99_ms:.1f}",
            f"{c.p999_ms:.1f}",
            "-" if ratio is None else f"{ratio:.2f}x",
            f"{c.throughput:,.0f}",
            str(c.errors) if not c.errors else f"[red]{c.errors}[/]",
            f"{c.others_cpu:.2f}",
        )
    return table


def _share_table(result: ScenarioResult) -> Table:
    table = Table(
        title=f"{result.scenario}: share of requests % (peak load) per indexer",
        caption="fair share = capacity share; peak load = most requests serving "
        "plus queued seen in 100 ms polls",
        caption_justify="left",
    )
    table.add_column("contender")
    first = result.contenders[0].indexers if result.contenders else ()
    for share in first:
        mark = " slow" if share.id == result.slow_indexer else ""
        table.add_column(
            f"{share.id} c{share.capacity}{mark}\nfair {share.capacity_share:.0%}",
            justify="right",
        )
    for c in result.contenders:
        table.add_row(c.name, *(f"{s.share:.0%} ({s.peak_load})" for s in c.indexers))
    return table


def require_matplotlib() -> None:
    """``UsageError`` saying how to install matplotlib, when it is missing.

    Worth calling before a long run that ends with a plot.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'p2plb[bench]'") from exc


def plot(report: BenchReport, path: Path | str) -> None:
    """Latency percentiles per contender and share per indexer, one row a scenario.

    ``UsageError`` when matplotlib is missing: ``pip install 'p2plb[bench]'``.
    """
    if not report.scenarios:
        raise UsageError(f"the {report.suite} suite has nothing to plot")
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(report.scenarios)
    figure, axes = plt.subplots(rows, 2, figsize=(13, 3.6 * rows), squeeze=False)
    levels: tuple[tuple[str, str], ...] = (
        ("p50_ms", "p50"),
        ("p90_ms", "p90"),
        ("p99_ms", "p99"),
    )
    levels += (("p999_ms", "p99.9"),)
    for row, result in zip(axes, report.scenarios, strict=True):
        names = [c.name for c in result.contenders]
        width = 0.8 / len(levels)
        for n, (key, label) in enumerate(levels):
            row[0].bar(
                [i + n * width for i in range(len(names))],
                [getattr(c, key) for c in result.contenders],
                width,
                label=label,
            )
        row[0].set_yscale("log")
        row[0].set_ylabel("latency, ms")
        row[0].set_title(f"{result.scenario}: latency per contender", fontsize=10)
        row[0].set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        row[0].set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        row[0].legend(fontsize=7)

        ids = [s.id for s in result.contenders[0].indexers]
        width = 0.8 / (len(names) + 1)
        fair = [s.capacity_share for s in result.contenders[0].indexers]
        row[1].bar(range(len(ids)), fair, width, color="black", label="fair")
        for n, c in enumerate(result.contenders, start=1):
            row[1].bar(
                [i + n * width for i in range(len(ids))],
                [s.share for s in c.indexers],
                width,
                label=c.name,
            )
        labels = [
            f"{s.id} c{s.capacity}" + (" slow" if s.id == result.slow_indexer else "")
            for s in result.contenders[0].indexers
        ]
        row[1].set_xticks([i + 0.4 - width / 2 for i in range(len(ids))])
        row[1].set_xticklabels(labels, fontsize=8)
        row[1].set_ylabel("share of requests")
        row[1].set_title(f"{result.scenario}: share per indexer", fontsize=10)
        row[1].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    plt.close(figure)
