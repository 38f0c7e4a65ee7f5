"""What benchmarks share: child processes, HAProxy, wrk and the CPU of others.

Rules of this module:

* A ``Child`` is one process a benchmark started.  It runs in a session of its
  own, so Ctrl-C reaches the benchmark, which then stops its children in
  order; ``stop`` sends SIGTERM and SIGKILL past a deadline.  Callers
  register ``stop`` on an exit stack the moment a child is spawned, so every
  child stops on success, failure or interrupt.
* ``P2PLB_*`` variables are removed from a child's environment: only the
  flags the benchmark passes count.
* A p2plb server is ready when its ``*.started`` log line names its URL;
  HAProxy when its port accepts connections.
* wrk's text output is parsed here, once, into a ``WrkResult``.
* The machine may be shared.  ``CpuMeter`` says how much CPU went to
  processes outside the benchmark (in CPUs: 0.5 is half a core), so that a
  figure taken under contention is visible as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2plb.errors import Timeout, Unreachable, UsageError

__all__ = [
    "Child",
    "CpuMeter",
    "WrkResult",
    "free_port",
    "haproxy_config",
    "p2plb_child",
    "parse_wrk",
    "rss_mib",
    "run_wrk",
    "start_haproxy",
    "wait_quiet",
]

STOP_DEADLINE_S = 15.0
_START_TIMEOUT_S = 30.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_STARTED = r"\b{kind}\.started .*?\burl=(\S+)"
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Stop signals that arrive inside the block are handled as it ends.

    A signal handler that raises (Ctrl-C, or the bench's SIGTERM handler)
    inside ``Popen``, after the fork but before the caller holds the
    ``Popen``, would leave a child that no one stops.  Blocking the signals
    instead is no good: a child inherits the blocked mask and would ignore
    its own SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs signal handlers
        return
    arrived: list[int] = []

    def note(signum: int, frame: object) -> None:
        arrived.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler not installed from Python; the default is ours.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for late in arrived:
            signal.raise_signal(late)


class Child:
    """A child process; ``ready`` is a regex its log matches once it serves.

    The first group of ``ready``, if it has one, becomes ``url``.
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

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise UsageError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
        env["PYTHONUNBUFFERED"] = "1"
        with _signals_held(), open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    async def wait_ready(self, within: float = _START_TIMEOUT_S) -> None:
        """Until the log matches ``ready``; ``Unreachable`` if the child exits."""
        if self.ready is None:
            return
        deadline = time.monotonic() + within
        while (match := self.ready.search(self.log())) is None:
            if not self.running:
                raise Unreachable(f"{self.name} exited at start:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise Timeout(
                    f"{self.name} was not ready in {within:g} s:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)
        self.url = match.group(1) if match.groups() else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

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
                return f"{self.name}: killed after {STOP_DEADLINE_S:g} s"
        return f"{self.name}: exited with {self.popen.returncode}"


def p2plb_child(
    name: str, kind: str, workdir: Path, *flags: str, pin: Sequence[str] = ()
) -> Child:
    """A ``p2plb balancer`` or ``p2plb indexer`` on a free loopback port."""
    args = [*pin, sys.executable, "-m", "p2plb", kind, "--port", "0", *flags]
    return Child(name, args, workdir, _STARTED.format(kind=kind))


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


# -- HAProxy ---------------------------------------------------------------------

_HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    timeout queue 10s

frontend bench
    bind 127.0.0.1:{port}
    default_backend indexers

backend indexers
    balance {balance}
{servers}
"""


def haproxy_config(
    port: int, balance: str, backends: Sequence[tuple[str, str, int]]
) -> str:
    """HAProxy in front of ``(name, url, weight)`` backends, one thread, HTTP.

    HAProxy takes weights up to 256; larger ones are cut to 256.
    """
    servers = "\n".join(
        f"    server {name} {url.removeprefix('http://')} weight {min(weight, 256)}"
        for name, url, weight in backends
    )
    return _HAPROXY_CONFIG.format(port=port, balance=balance, servers=servers)


async def start_haproxy(
    stack: contextlib.AsyncExitStack,
    workdir: Path,
    balance: str,
    backends: Sequence[tuple[str, str, int]],
    *,
    binary: str = "haproxy",
    pin: Sequence[str] = (),
) -> Child:
    """HAProxy with ``balance``, checked, started and listening; stopped on exit."""
    found = shutil.which(binary)
    if found is None:
        raise UsageError(f"no {binary} binary on PATH")
    port = free_port()
    config = workdir / f"haproxy-{balance}.cfg"
    config.write_text(haproxy_config(port, balance, backends))
    check = await asyncio.to_thread(
        subprocess.run,
        [found, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise UsageError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}")

    haproxy = Child(
        f"haproxy-{balance}", [*pin, found, "-db", "-f", str(config)], workdir, None
    )
    haproxy.spawn()
    stack.callback(haproxy.stop)
    haproxy.url = f"http://127.0.0.1:{port}"

    deadline = time.monotonic() + 10.0
    while True:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1.0),
        ):
            return haproxy
        if not haproxy.running or time.monotonic() > deadline:
            raise Unreachable(f"haproxy does not listen on {port}:\n{haproxy.tail()}")
        await asyncio.sleep(0.05)


# -- CPU used by others ------------------------------------------------------------

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
    children = times.children_user + times.children_system
    return total + times.user + times.system + children


class CpuMeter:
    """CPUs' worth of time used since creation by processes other than ``pids``."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = (time.monotonic(), _busy_s(), _ours_s(self.pids))

    def others(self) -> float:
        at, busy, ours = time.monotonic(), _busy_s(), _ours_s(self.pids)
        elapsed = max(at - self._start[0], 1e-9)
        foreign = (busy - self._start[1]) - (ours - self._start[2])
        return max(0.0, foreign / elapsed)


async def wait_quiet(pids: Sequence[int], *, limit: float, within: float) -> float:
    """Until others use under ``limit`` CPUs for a second; returns their use.

    Gives up after ``within`` seconds and returns the last figure, so a busy
    machine slows a benchmark down but never stops it.
    """
    deadline = time.monotonic() + within
    while True:
        meter = CpuMeter(pids)
        await asyncio.sleep(1.0)
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
        raise UsageError(f"wrk printed a time it cannot read: {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> str:
        match = re.search(pattern, output)
        if match is None:
            raise UsageError(f"no {pattern!r} in wrk's output:\n{output}")
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


async def run_wrk(
    url: str,
    *,
    threads: int,
    connections: int,
    duration: float,
    script: Path | None = None,
    ours: Sequence[int] = (),
    pin: Sequence[str] = (),
) -> WrkResult:
    """One wrk run; ``ours`` are the benchmark's servers, for ``others_cpu``."""
    binary = shutil.which("wrk")
    if binary is None:
        raise UsageError("wrk is not installed (apt-get install wrk)")
    command = [
        *pin,
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        *([] if script is None else ["-s", str(script)]),
        url,
    ]
    meter = CpuMeter(ours)
    done = await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
    )
    if done.returncode != 0:
        raise Unreachable(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    result = parse_wrk(done.stdout)
    result.others_cpu = meter.others()
    return result
