"""A balancer and indexers as real processes on loopback, for the demo and benches.

Rules of this module:

* Each server is ``python -m p2plb ...`` with ``--port 0``, logging to a file
  in the cluster's directory; it is up when its ``*.started`` log line names
  its URL.  The cluster is up when the balancer's ``/v1/status`` lists every
  indexer healthy and serving.
* The servers read no ``P2PLB_`` variable of the caller's environment: the
  cluster is exactly what its flags say.
* They run in sessions of their own, started with ``subprocess`` rather than
  asyncio (which kills a child still running when its loop closes), so a
  cluster can outlive the loop that started it; ``stop`` is SIGTERM, a grace
  period, then SIGKILL, indexers first so they unregister from a live balancer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from p2plb.errors import Timeout, Unreachable

__all__ = ["LocalCluster", "LocalServer"]

logger = logging.getLogger(__name__)

_STARTED = re.compile(r"(?:indexer|balancer)\.started .*?\burl=(\S+)")
_START_TIMEOUT = 20.0  # seconds for a server to log that it started
_SERVING_TIMEOUT = 20.0  # seconds for the balancer to see every indexer serving
_STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


class LocalServer:
    """One p2plb server process, logging to a file in the demo's directory."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.url = ""
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def spawn(self) -> None:
        # The servers read no P2PLB_ variable of the user's shell: the demo
        # cluster is exactly what its flags say.
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
        env["PYTHONUNBUFFERED"] = "1"
        # subprocess and not asyncio's: asyncio kills a child still running
        # when its loop closes, and --keep-running must outlive the loop.  A
        # session of their own keeps Ctrl-C for the demo, which stops them.
        with open(self.log_path, "wb") as log:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "p2plb", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        logger.debug("cluster.spawned name=%s pid=%d", self.name, self.pid)

    async def wait_started(self) -> None:
        """Wait for the ``*.started`` log line and take the URL it names."""
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            found = _STARTED.search(self.log_path.read_text(errors="replace"))
            if found is not None:
                self.url = found.group(1)
                return
            if not self.running:
                raise Unreachable(f"{self.name} exited at start:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise Timeout(
                    f"{self.name} did not start within {_START_TIMEOUT:g} s:\n"
                    f"{self.tail()}"
                )
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.running:
            os.kill(self.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after the grace period."""
        if self._popen is None or not self.running:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self._popen.wait, _STOP_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("cluster.stop_timeout name=%s pid=%d", self.name, self.pid)
            self.kill()
            await asyncio.to_thread(self._popen.wait)

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class LocalCluster:
    """A balancer and its indexers on loopback, and the balancer's view of them."""

    def __init__(
        self,
        workdir: Path,
        *,
        indexers: int,
        strategy: str = "least_load",
        indexer_flags: Sequence[str] = (),
        balancer_flags: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.count = indexers
        self.indexer_flags = list(indexer_flags)
        self.balancer = LocalServer(
            "balancer",
            ["balancer", "--port", "0", "--state-file", "balancer-state.json"]
            + ["--strategy", strategy, *balancer_flags],
            workdir,
        )
        self.indexers: list[LocalServer] = []
        self._http: aiohttp.ClientSession | None = None

    @property
    def servers(self) -> list[LocalServer]:
        return [self.balancer, *self.indexers]

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.balancer.spawn()
        await self.balancer.wait_started()

        for number in range(1, self.count + 1):
            name = f"i{number}"
            args = ["indexer", "--id", name, "--port", "0", "--data-dir", name]
            args += ["--balancer", self.balancer.url, *self.indexer_flags]
            self.indexers.append(LocalServer(name, args, self.workdir))
            self.indexers[-1].spawn()
        waits = [asyncio.create_task(s.wait_started()) for s in self.indexers]
        try:
            await asyncio.gather(*waits)
        finally:
            for wait in waits:  # the others, when one of them failed
                wait.cancel()

        deadline = time.monotonic() + _SERVING_TIMEOUT
        while True:
            status = await self.status()
            rows = status.get("indexers", [])
            serving = [r for r in rows if r["healthy"] and r["state"] == "serving"]
            if len(serving) == len(self.indexers):
                return
            if time.monotonic() > deadline:
                raise Timeout(
                    f"the balancer sees {len(serving)} of {len(self.indexers)} "
                    f"indexers serving after {_SERVING_TIMEOUT:g} s"
                )
            await asyncio.sleep(0.1)

    async def status(self) -> dict[str, Any]:
        """The balancer's ``/v1/status``."""
        assert self._http is not None
        url = self.balancer.url + "/v1/status"
        try:
            async with self._http.get(url) as response:
                response.raise_for_status()
                body: dict[str, Any] = await response.json()
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"balancer {self.balancer.url}: {exc}") from exc

    async def close(self) -> None:
        """Stop asking the balancer; the servers stay up."""
        if self._http is not None:
            await self._http.close()

    async def stop(self) -> None:
        """Indexers first, so they unregister from a balancer still there."""
        await self.close()
        await asyncio.gather(*(s.stop() for s in self.indexers))
        await self.balancer.stop()
