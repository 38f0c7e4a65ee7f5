"""The bench: its open-loop scheduler on a fake clock, and one tiny real run."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from rich.console import Console

from p2plb import benchmark, harness
from p2plb.benchmark import BenchOptions, Scenario, contender_names, run_bench
from p2plb.benchreport import render
from p2plb.cli import cli
from p2plb.config import STRATEGY_NAMES
from p2plb.errors import UsageError
from p2plb.harness import Child
from p2plb.loadgen import Bursts, OpenLoop, arrivals, percentile
from procs import Procs, request


class FakeClock:
    """Time that moves only when the code under test sleeps or works."""

    def __init__(self) -> None:
        self.now = 100.0
        self.overshoot = 0.0  # how late every sleep wakes up

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake = self.now + seconds
        await asyncio.sleep(0)  # what is due now runs now
        self.now = max(self.now, wake) + self.overshoot


# -- arrivals ----------------------------------------------------------------------


def test_arrivals_are_poisson_at_the_rate() -> None:
    offsets = arrivals(500.0, 200.0, random.Random(1))
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]

    assert offsets == sorted(offsets)
    assert offsets[0] >= 0.0 and offsets[-1] < 200.0
    assert len(offsets) / 200.0 == pytest.approx(500.0, rel=0.02)
    # Exponential gaps: mean 1/rate, coefficient of variation 1.
    assert statistics.fmean(gaps) == pytest.approx(1 / 500.0, rel=0.02)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(
        1.0, abs=0.03
    )


def test_arrivals_are_the_same_for_a_seed() -> None:
    assert arrivals(50.0, 10.0, random.Random(3)) == arrivals(
        50.0, 10.0, random.Random(3)
    )
    assert arrivals(0.0, 10.0, random.Random(3)) == []


def test_bursts_raise_the_rate_and_keep_the_mean() -> None:
    bursts = Bursts(period=5.0, length=1.0, factor=2.0)
    offsets = arrivals(300.0, 500.0, random.Random(2), bursts)
    inside = sum(1 for t in offsets if t % 5.0 < 1.0)
    outside = len(offsets) - inside

    assert len(offsets) / 500.0 == pytest.approx(300.0, rel=0.03)
    # One second in five at twice the rate: inside / 100 s vs outside / 400 s.
    assert (inside / 100.0) / (outside / 400.0) == pytest.approx(2.0, rel=0.05)


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.999) == 100.0
    assert percentile([7.0], 0.5) == 7.0
    assert math.isnan(percentile([], 0.5))


# -- the open loop, on a fake clock ------------------------------------------------


async def test_open_loop_sends_on_schedule_without_waiting_for_answers() -> None:
    clock = FakeClock()
    sent_at: list[float] = []
    all_sent, release = asyncio.Event(), asyncio.Event()

    async def send() -> bool:
        sent_at.append(clock.now)
        if len(sent_at) == 4:
            all_sent.set()
        await release.wait()  # no answer until every request was sent
        return True

    loop = OpenLoop(send, clock=clock, sleep=clock.sleep)
    run = asyncio.create_task(loop.run([0.0, 0.5, 1.0, 2.5]))
    await all_sent.wait()
    clock.now += 1.0  # every answer arrives one second after the last send
    release.set()
    samples = await run

    assert sent_at == [100.0, 100.5, 101.0, 102.5]
    assert [s.scheduled for s in samples] == [0.0, 0.5, 1.0, 2.5]
    assert [s.latency for s in samples] == [3.5, 3.0, 2.5, 1.0]
    assert all(s.ok for s in samples)
    assert loop.late == 0.0


async def test_latency_counts_from_the_scheduled_time_when_the_generator_lags() -> None:
    clock = FakeClock()
    clock.overshoot = 0.25  # every sleep wakes up 250 ms late

    async def send() -> bool:
        clock.now += 0.125  # service
        return True

    loop = OpenLoop(send, clock=clock, sleep=clock.sleep)
    samples = await loop.run([1.0, 3.0])

    # Each request started 250 ms after it was due: that wait is latency.
    assert [s.latency for s in samples] == [0.375, 0.375]
    assert loop.late == 0.25


async def test_waiting_for_a_connection_counts_as_latency() -> None:
    clock = FakeClock()
    answers: list[asyncio.Future[bool]] = []
    asked = asyncio.Condition()

    async def send() -> bool:
        answers.append(asyncio.get_running_loop().create_future())
        async with asked:
            asked.notify_all()
        return await answers[-1]

    loop = OpenLoop(send, limit=1, clock=clock, sleep=clock.sleep)
    run = asyncio.create_task(loop.run([0.0, 0.0]))
    for n in (1, 2):
        async with asked:
            await asked.wait_for(lambda n=n: len(answers) == n)  # type: ignore[misc]
        clock.now += 0.25
        answers[-1].set_result(n == 1)
    samples = await run

    # The second was due at once but had to wait for the only connection.
    assert [(s.latency, s.ok) for s in samples] == [(0.25, True), (0.5, False)]


def test_open_loop_needs_a_connection() -> None:
    async def send() -> bool:
        return True

    with pytest.raises(ValueError):
        OpenLoop(send, limit=0)


# -- options -----------------------------------------------------------------------


def test_scenarios_offer_the_load_asked_for() -> None:
    options = BenchOptions()
    steady = options.scenario("steady")

    assert steady.rate == pytest.approx(0.8 * 14 / 0.020)
    assert options.scenario("antagonist").slow_indexer == 4
    assert BenchOptions(quick=True).scenario("antagonist").antagonist == (5.0, 1.0)
    assert BenchOptions(load=0.5).scenario("stale").load == 0.5
    with pytest.raises(UsageError):
        options.scenario("nope")


def test_contenders_are_chosen_by_name_or_family() -> None:
    every = contender_names(haproxy=True)
    assert every == [
        *(f"proxy/{name}" for name in STRATEGY_NAMES),
        *(f"routed/{name}" for name in STRATEGY_NAMES),
        "haproxy/leastconn",
        "haproxy/roundrobin",
    ]
    assert contender_names(haproxy=False) == every[:-2]
    chosen = BenchOptions(contenders=("routed", "haproxy/leastconn")).chosen(False)
    assert chosen == [name for name in contender_names(False) if "routed" in name]
    with pytest.raises(UsageError):
        BenchOptions(contenders=("nginx",)).chosen(True)


# -- a tiny real run ---------------------------------------------------------------


@pytest.mark.slow
async def test_a_tiny_bench_runs_every_contender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    haproxy = shutil.which("haproxy") is not None
    tiny = Scenario("steady", load=0.5, capacities=(1, 2), duration=0.6, warmup=0.2)
    monkeypatch.setitem(benchmark.SCENARIOS, "steady", tiny)
    options = BenchOptions(scenarios=("steady",), workdir=tmp_path, quiet_timeout=0)
    console = Console(file=io.StringIO(), width=150)

    report = await run_bench(options, console)

    shape = json.loads(report.to_json())
    assert set(shape) == {
        "suite",
        "quick",
        "seed",
        "machine",
        "scenarios",
        "figures",
        "wall_time_s",
    }
    (scenario,) = shape["scenarios"]
    # Every contender, HAProxy's too where the binary is installed.
    expected = contender_names(haproxy)
    assert [c["name"] for c in scenario["contenders"]] == expected
    for contender in scenario["contenders"]:
        assert contender["requests"] > 0
        assert contender["errors"] == 0
        assert contender["p50_ms"] <= contender["p99_ms"] <= contender["max_ms"]
        assert [i["id"] for i in contender["indexers"]] == ["i1", "i2"]
        assert (
            sum(i["served"] for i in contender["indexers"]) >= (contender["requests"])
        )
        assert sum(i["share"] for i in contender["indexers"]) == pytest.approx(1.0)
    if haproxy:
        assert report.scenarios[0].ratio("haproxy/leastconn") == 1.0
    Console(file=io.StringIO(), width=150).print(render(report))


def _started_in(workdir: Path, bench: int) -> list[int]:
    """Processes other than ``bench`` whose command line names ``workdir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != bench:
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(workdir) in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigterm_stops_the_bench_and_every_process_it_started(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
    bench = subprocess.Popen(
        [sys.executable, "-m", "p2plb", "bench", "steady", "--no-haproxy"]
        + ["--contender", "proxy/least_load", "--duration", "60"]
        + ["--quiet-timeout", "0", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_started_in(workdir, bench.pid)) < 7:  # balancer, 6 indexers
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.2)
        servers = _started_in(workdir, bench.pid)

        bench.send_signal(signal.SIGTERM)
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            for pid in _started_in(workdir, bench.pid):
                os.kill(pid, signal.SIGKILL)

    assert bench.returncode == 130, out + err
    assert err.endswith(
        "p2plb: error: interrupted; every process it started was stopped\n"
    ), err
    assert _started_in(workdir, bench.pid) == []
    assert not [pid for pid in servers if Path(f"/proc/{pid}").exists()]


def test_a_stop_signal_while_a_child_spawns_still_leaves_it_stoppable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_popen = subprocess.Popen

    def popen_then_signal(*args: Any, **kwargs: Any) -> Any:
        # The signal lands after the fork, before Popen returns: the window
        # in which a raising handler used to lose the child.
        started = real_popen(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return started

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.subprocess, "Popen", popen_then_signal)
    previous = signal.signal(signal.SIGTERM, interrupt)
    child = Child(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path, None
    )
    try:
        with pytest.raises(KeyboardInterrupt):
            child.spawn()
        assert child.running
    finally:
        signal.signal(signal.SIGTERM, previous)
        assert child.stop() == "sleeper: exited with -15"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_bench_flags_out_of_range_are_refused() -> None:
    for flags, message in (
        (
            ["--connections", "0"],
            "Invalid value for '--connections': 0 is not in the range x>=1.",
        ),
        (
            ["--duration", "-1"],
            "Invalid value for '--duration': -1.0 is not in the range x>0.",
        ),
    ):
        result = CliRunner().invoke(cli, ["bench", *flags])
        assert result.exit_code == 2
        assert message in result.output, result.output


async def test_the_bare_forwarder_forwards_and_stops(
    procs: Procs, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    indexer = procs.indexer("i1")
    body = {"item": "a"}
    await request(http, "POST", f"{indexer.url}/v1/indices/x/items", json=body)
    bare = Child(
        "bare",
        [sys.executable, "-m", "p2plb.forwarder", "--port", "0", indexer.url],
        tmp_path,
        r"\bforwarder\.started url=(\S+)",
    )
    bare.spawn()
    try:
        await bare.wait_ready()
        status, got, _ = await request(http, "GET", f"{bare.url}/v1/indices/x?limit=5")
        assert (status, got["items"]) == (200, ["a"])
    finally:
        assert bare.stop() == "bare: exited with 0"
