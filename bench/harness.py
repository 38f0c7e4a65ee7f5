"""What the benchmarks in this folder share: child processes, wrk, CPU placement.

Rules of this module:

* A ``Child`` is one process started for a benchmark.  It gets a session of
  its own, so Ctrl-C reaches the benchmark only, which then stops its children
  in order; ``stop`` sends SIGTERM and falls back to SIGKILL past a deadline.
  Callers register ``stop`` in a ``contextlib.ExitStack`` the moment a child
  starts, so every child is stopped on success, failure or interrupt.
* Settings a p2plb server would read from ``P2PLB_*`` variables are removed
  from a child's environment: only the flags the benchmark passes count.
* wrk's text output is parsed here, once, into a ``WrkResult``.
* The machine may be shared with other work.  Each wrk run records how much
  CPU went to processes that are not part of the benchmark (``others_cpu``,
  in CPUs: 0.5 is half a core), and ``wait_quiet`` holds a run back until the
  rest of the machine is idle, so that a figure taken under contention is
  either avoided or visible as such.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "STOP_DEADLINE_S",
    "BenchError",
    "Child",
    "Placement",
    "WrkResult",
    "free_port",
    "http",
    "p2plb_ready",
    "place",
    "rss_mib",
    "run_wrk",
    "wait_quiet",
]

STOP_DEADLINE_S = 15.0
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A step of a benchmark failed; the message says which and why."""


class Child:
    """A child process whose log says ``ready`` (a regex) once it serves.

    The first group of ``ready``, if any, is kept as ``url``.
    """

    def __init__(
        self, name: str, args: Sequence[str], workdir: Path, ready: str | None
    ) -> None:
        self.name = name
        self.args = list(args)
        self.ready = None if ready is None else re.compile(ready)
        self.log_path = workdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        if self.ready is None:
            return

        deadline = time.monotonic() + timeout
        while (match := self.ready.search(self.log())) is None:
            if self.popen.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} was not ready in {timeout:g}s:\n{self.log()}"
                )
            time.sleep(0.05)
        self.url = match.group(1) if match.groups() else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} was never started")
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


def p2plb_ready(kind: str) -> str:
    """The regex that finds the URL in ``<kind>.started url=...``."""
    return rf"\b{kind}\.started .*?\burl=(\S+)"


def http(method: str, url: str, payload: Any = None, timeout: float = 30.0) -> bytes:
    """One request with the standard library; raises on any status >= 400."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body: bytes = answer.read()
    return body


def free_port() -> int:
    """A loopback port free right now (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def rss_mib(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024.0
    return fields


# -- CPU used by others -----------------------------------------------------------

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def _ours_s(pids: Sequence[int]) -> float:
    """CPU seconds used by ``pids``, this process and its reaped children."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(stat[11]) + int(stat[12])) * _TICK_S  # utime, stime
    times = os.times()
    return (
        total
        + times.user
        + times.system
        + times.children_user
        + (times.children_system)
    )


class CpuMeter:
    """CPUs' worth of time used by processes other than ``pids`` and us."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = (time.monotonic(), _busy_s(), _ours_s(self.pids))

    def others(self) -> float:
        at, busy, ours = time.monotonic(), _busy_s(), _ours_s(self.pids)
        elapsed = max(at - self._start[0], 1e-9)
        foreign = (busy - self._start[1]) - (ours - self._start[2])
        return max(0.0, foreign / elapsed)


def wait_quiet(
    pids: Sequence[int], *, limit: float = 0.15, timeout: float = 180.0
) -> float:
    """Wait until others use under ``limit`` CPUs for a second; return their use.

    Gives up after ``timeout`` seconds and returns the last figure, so that a
    busy machine slows the benchmark down but never stops it.
    """
    deadline = time.monotonic() + timeout
    while True:
        meter = CpuMeter(pids)
        time.sleep(1.0)
        others = meter.others()
        if others < limit or time.monotonic() > deadline:
            return others


# -- wrk ---------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int  # non-2xx answers plus socket errors
    others_cpu: float = 0.0  # CPUs used by processes outside the benchmark


def _time_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"wrk printed a time it cannot read: {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> str:
        match = re.search(pattern, output)
        if match is None:
            raise BenchError(f"no {pattern!r} in wrk's output:\n{output}")
        return match.group(1)

    errors = sum(
        int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output)
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return WrkResult(
        rps=float(find(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=_time_ms(find(r"\n\s+50%\s+(\S+)")),
        p99_ms=_time_ms(find(r"\n\s+99%\s+(\S+)")),
        max_ms=_time_ms(find(r"\n\s+Latency\s+\S+\s+\S+\s+(\S+)")),
        requests=int(find(r"(\d+) requests in")),
        errors=errors,
    )


def run_wrk(
    pin: Sequence[str],
    url: str,
    *,
    threads: int,
    connections: int,
    duration: float,
    script: Path | None = None,
    ours: Sequence[int] = (),
) -> WrkResult:
    """One wrk run; ``ours`` are the benchmark's servers, for ``others_cpu``."""
    command = [
        *pin,
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        *([] if script is None else ["-s", str(script)]),
        url,
    ]
    meter = CpuMeter(ours)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    others = meter.others()
    if done.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    result = parse_wrk(done.stdout)
    result.others_cpu = others
    return result


# -- CPU placement -----------------------------------------------------------------


@dataclass
class Placement:
    server: list[str]  # command prefix for the servers under test
    client: list[str]  # command prefix for the load generator
    client_cpus: set[int]  # for os.sched_setaffinity of in-process loops
    note: str


def place(enabled: bool) -> Placement:
    """Servers on the first CPU, the load generator on the second, if possible."""
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if not enabled:
        return Placement([], [], set(cpus), "not pinned (--no-pin)")
    if taskset is None or len(cpus) < 2:
        why = "no taskset" if taskset is None else f"only CPU {cpus[0]} available"
        return Placement([], [], set(cpus), f"not pinned ({why})")
    server, client = cpus[0], cpus[1]
    return Placement(
        [taskset, "-c", str(server)],
        [taskset, "-c", str(client)],
        {client},
        f"servers under test on CPU {server}, load generator on CPU {client} "
        "(taskset -c)",
    )
