"""Read throughput of one indexer, measured next to a minimal aiohttp app.

Usage: .venv/bin/python bench/indexer_read.py [--rounds 3] [--duration 10]

Rules of this benchmark:

* Two servers in their own processes: a real ``p2plb indexer`` holding one
  100-item index, and a minimal aiohttp app answering the very bytes the
  indexer answers.  Both run on uvloop with no access log, so the gap between
  them is what p2plb adds (routing, validation, limiter, SQLite, encoding).
* ``wrk`` loads one server at a time.  After a warm-up of each, the two take
  turns for ``--rounds`` rounds, the order flipping every round so a slow drift
  of the machine does not favour one side; the medians are reported.
* With two CPUs or more, the servers run on one CPU and wrk on another
  (``taskset -c``), so load generator and server never compete.
* Every process started here is stopped here, on success, failure, Ctrl-C or
  SIGTERM: servers get SIGTERM, then SIGKILL if they outlive a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

INDEX = "bench"
ITEMS = 100
TARGETS = ("indexer", "minimal")
STARTED = re.compile(r"\b(?:indexer|minimal)\.started .*?\burl=(\S+)")
STOP_DEADLINE_S = 15.0

console = Console(stderr=True)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# -- the minimal app, run in a child process of its own -------------------------


async def serve_minimal(body: bytes) -> None:
    """Answer ``GET /v1/indices/{name}`` with ``body`` until SIGTERM or SIGINT."""
    from aiohttp import web

    async def get_index(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/indices/{name}", get_index)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = runner.addresses[0][1]
    print(f"minimal.started url=http://127.0.0.1:{port}", file=sys.stderr, flush=True)

    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_minimal(body_file: str) -> None:
    import uvloop

    uvloop.run(serve_minimal(Path(body_file).read_bytes()))


# -- server processes ------------------------------------------------------------


class Server:
    """A server child process that logs ``<kind>.started url=...`` when ready."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = workdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> None:
        # Only the flags count: settings from the environment would skew a run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            # A session of its own: Ctrl-C reaches this script only, which then
            # stops the servers in order instead of all processes at once.
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

        deadline = time.monotonic() + timeout
        while (match := STARTED.search(self.log())) is None:
            if self.popen.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not start in {timeout}s:\n{self.log()}"
                )
            time.sleep(0.05)
        self.url = match.group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stop(self) -> str:
        """SIGTERM, then SIGKILL past the deadline; says how it ended."""
        if self.popen is None:
            return f"{self.name}: never started"
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                return f"{self.name}: killed after {STOP_DEADLINE_S:g}s"
        return f"{self.name}: exited with {self.popen.returncode}"


# -- HTTP set-up -------------------------------------------------------------------


def http(method: str, url: str, payload: Any = None) -> bytes:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:
        body: bytes = answer.read()
    return body


def fill_index(base_url: str) -> bytes:
    """Write the 100 items in one POST; return the indexer's answer to a read."""
    items = [f"bench-item-{i:04d}" for i in range(ITEMS)]
    http("POST", f"{base_url}/v1/indices/{INDEX}/items", {"items": items})

    body = http("GET", f"{base_url}/v1/indices/{INDEX}")
    got = json.loads(body)
    if got.get("items") != items:
        raise BenchError(f"the index reads back wrong: {body[:200]!r}")
    return body


# -- wrk ---------------------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _time_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"wrk printed a time it cannot read: {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> Result:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output)
        if match is None:
            raise BenchError(f"no {pattern!r} in wrk's output:\n{output}")
        return match

    errors = sum(
        int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output)
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return Result(
        rps=float(find(r"Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_time_ms(find(r"\n\s+50%\s+(\S+)").group(1)),
        p99_ms=_time_ms(find(r"\n\s+99%\s+(\S+)").group(1)),
        requests=int(find(r"(\d+) requests in").group(1)),
        errors=errors,
    )


def run_wrk(
    pin: Sequence[str], url: str, args: argparse.Namespace, duration: float
) -> Result:
    command = [
        *pin,
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration:g}s",
        "--latency",
        url,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


# -- CPU placement -----------------------------------------------------------------


@dataclass
class Placement:
    server: list[str]  # command prefix for the servers
    client: list[str]  # command prefix for wrk
    note: str


def place(enabled: bool) -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if not enabled:
        return Placement([], [], "not pinned (--no-pin)")
    if taskset is None or len(cpus) < 2:
        why = "no taskset" if taskset is None else f"only CPU {cpus[0]} available"
        return Placement([], [], f"not pinned ({why})")
    server, client = cpus[0], cpus[1]
    return Placement(
        [taskset, "-c", str(server)],
        [taskset, "-c", str(client)],
        f"servers on CPU {server}, wrk on CPU {client} (taskset -c)",
    )


# -- the benchmark -----------------------------------------------------------------


def start_servers(
    stack: contextlib.ExitStack, workdir: Path, placement: Placement, capacity: int
) -> dict[str, Server]:
    indexer = Server(
        "indexer",
        [
            *placement.server,
            sys.executable,
            "-m",
            "p2plb",
            "indexer",
            "--id",
            "bench",
            "--port",
            "0",
            "--data-dir",
            str(workdir / "data"),
            "--capacity",
            str(capacity),
        ],
        workdir,
    )
    stack.callback(lambda: console.print(f"stopped {indexer.stop()}"))
    indexer.start()
    body = fill_index(indexer.url)

    body_file = workdir / "answer.json"
    body_file.write_bytes(body)
    minimal = Server(
        "minimal",
        [
            *placement.server,
            sys.executable,
            __file__,
            "--serve-minimal",
            str(body_file),
        ],
        workdir,
    )
    stack.callback(lambda: console.print(f"stopped {minimal.stop()}"))
    minimal.start()

    # Same bytes on both sides, or the comparison means nothing.
    if http("GET", f"{minimal.url}/v1/indices/{INDEX}") != body:
        raise BenchError("the minimal app does not answer the indexer's bytes")
    console.print(
        f"indexer pid {indexer.pid} at {indexer.url}, minimal pid {minimal.pid} "
        f"at {minimal.url}; answer {len(body)} bytes"
    )
    return {"indexer": indexer, "minimal": minimal}


def measure(
    servers: dict[str, Server], placement: Placement, args: argparse.Namespace
) -> dict[str, list[Result]]:
    urls = {name: f"{s.url}/v1/indices/{INDEX}" for name, s in servers.items()}
    for name in TARGETS:
        console.print(f"warm-up {name} {args.warmup:g}s")
        run_wrk(placement.client, urls[name], args, args.warmup)

    results: dict[str, list[Result]] = {name: [] for name in TARGETS}
    for round_no in range(args.rounds):
        order = TARGETS if round_no % 2 == 0 else TARGETS[::-1]
        for name in order:
            result = run_wrk(placement.client, urls[name], args, args.duration)
            results[name].append(result)
            console.print(
                f"round {round_no + 1}/{args.rounds} {name}: "
                f"{result.rps:,.0f} req/s p50 {result.p50_ms:.2f} ms "
                f"p99 {result.p99_ms:.2f} ms errors {result.errors}"
            )
    return results


def summarize(
    results: dict[str, list[Result]], args: argparse.Namespace, placement: Placement
) -> dict[str, Any]:
    medians = {
        name: {
            "rps": statistics.median(r.rps for r in runs),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "errors": sum(r.errors for r in runs),
        }
        for name, runs in results.items()
    }
    return {
        "path": f"GET /v1/indices/{INDEX} ({ITEMS} items)",
        "load_generator": (
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency"
        ),
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "placement": placement.note,
        "load_average": os.getloadavg(),
        "runs": {name: [asdict(r) for r in runs] for name, runs in results.items()},
        "median": medians,
        "ratio": medians["indexer"]["rps"] / medians["minimal"]["rps"],
    }


def show(summary: dict[str, Any]) -> None:
    table = Table(
        title=f"{summary['path']}, median of {summary['rounds']} rounds",
        caption=f"{summary['load_generator']}; {summary['placement']}",
    )
    table.add_column("server")
    table.add_column("req/s", justify="right")
    table.add_column("each round", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("errors", justify="right")
    for name in TARGETS:
        median = summary["median"][name]
        rounds = " ".join(f"{run['rps']:,.0f}" for run in summary["runs"][name])
        table.add_row(
            name,
            f"{median['rps']:,.0f}",
            rounds,
            f"{median['p50_ms']:.2f}",
            f"{median['p99_ms']:.2f}",
            str(median["errors"]),
        )

    out = Console()
    out.print(table)
    verdict = "meets" if summary["ratio"] >= 0.6 else "is below"
    out.print(
        f"indexer / minimal = {summary['ratio']:.2f} ({verdict} the aim of 0.60); "
        f"load average {', '.join(f'{x:.2f}' for x in summary['load_average'])}"
    )


def _terminated(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="s per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="s per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--capacity", type=int, default=1024, help="of the indexer")
    parser.add_argument("--no-pin", action="store_true", help="skip taskset")
    parser.add_argument("--json", metavar="PATH", help="also write results here")
    parser.add_argument("--serve-minimal", metavar="BODY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.connections < args.threads:
        parser.error("need --rounds >= 1, --duration >= 1, --connections >= --threads")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_minimal:
        run_minimal(args.serve_minimal)
        return 0
    if shutil.which("wrk") is None:
        console.print("wrk is not installed: apt-get install wrk")
        return 2

    # SIGTERM unwinds like Ctrl-C, so the finally clauses stop the servers.
    signal.signal(signal.SIGTERM, _terminated)
    placement = place(not args.no_pin)
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            servers = start_servers(stack, workdir, placement, args.capacity)
            results = measure(servers, placement, args)
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; servers stopped")
        return 130

    summary = summarize(results, args, placement)
    show(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
