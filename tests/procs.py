"""Real p2plb processes on loopback, for integration tests.

Each process logs to a file in the test's tmp directory; readiness is the
``*.started`` log line, which carries the real URL (servers bind port 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

STARTED = re.compile(r"(indexer|balancer)\.started .*?\burl=(\S+)")


class Proc:
    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> Proc:
        self.spawn()
        return self.wait_started(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it: several start at once."""
        env = dict(os.environ)
        env.pop("P2PLB_CONFIG", None)
        env["PYTHONUNBUFFERED"] = "1"
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "p2plb", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
        )
        log.close()

    def wait_started(self, timeout: float = 20.0) -> Proc:
        match = self.wait_for(STARTED, timeout)
        self.url = match.group(2)
        return self

    def keep_port(self) -> None:
        """Start again on the port it has now, as a server restarted in place
        does: balancers and peers still know it by its address."""
        port = self.url.rsplit(":", 1)[1]
        self.args = [*self.args, "--port", port]  # the last --port wins

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[self._offset :]

    def wait_for(
        self, pattern: re.Pattern[str] | str, timeout: float = 20.0
    ) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {regex.pattern!r} in:\n{self.log()}"
                )
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def kill(self) -> None:
        if self.running:
            self.signal(signal.SIGKILL)
            assert self.popen is not None
            self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        assert self.popen is not None
        if self.running:
            self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop in {timeout}s:\n{self.log()}"
            ) from None


class Procs:
    """Starts processes for one test and stops every one of them afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Proc] = []

    def indexer(
        self, id: str, *extra: str, start: bool = True, name: str | None = None
    ) -> Proc:
        """``name`` (default: ``id``) names its log and data directory, so that
        two processes of one id can run side by side."""
        name = name or id
        args = ["indexer", "--id", id, "--port", "0", "--data-dir", f"data-{name}"]
        proc = Proc(name, [*args, *extra], self.workdir)
        self.all.append(proc)
        return proc.start() if start else proc

    def balancer(self, name: str = "balancer", *extra: str, start: bool = True) -> Proc:
        args = ["balancer", "--port", "0", "--state-file", f"{name}-state.json"]
        proc = Proc(name, [*args, *extra], self.workdir)
        self.all.append(proc)
        return proc.start() if start else proc

    def close(self) -> None:
        for proc in self.all:
            proc.kill()


async def request(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    """(status, decoded JSON body or None, headers) of one HTTP call."""
    async with http.request(method, url, **kwargs) as response:
        raw = await response.read()
        body = json.loads(raw) if raw else None
        return response.status, body, response.headers


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 15.0, every: float = 0.05
) -> float:
    """Wait until ``check`` holds; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(every)
    return time.monotonic() - started
