"""What the scripts in this folder need beyond ``p2plb.harness``.

Child processes, wrk, HAProxy and the CPU used by others come from
``p2plb.harness``, the module ``p2plb bench`` uses; this module adds only what
the standalone scripts want on top: a blocking start, a blocking HTTP call for
set-up, and the CPU placement behind their ``--no-pin`` flag.

Rules of this module:

* ``start`` registers a child's ``stop`` on the caller's ``ExitStack`` before
  it waits for the child, so a child that never gets ready is stopped too.
* A step that fails raises ``BenchError``; ``FAILED`` also holds the errors
  ``p2plb.harness`` raises, so a script catches both with one clause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2plb.errors import P2PLBError
from p2plb.harness import Child

__all__ = ["FAILED", "BenchError", "Placement", "http", "place", "start"]


class BenchError(Exception):
    """A step of a benchmark failed; the message says which and why."""


FAILED = (BenchError, P2PLBError)


def start(
    stack: contextlib.ExitStack, child: Child, say: Callable[[str], object] = print
) -> Child:
    """Spawn ``child``, have ``stack`` stop it, and wait until it is ready."""
    child.spawn()
    stack.callback(lambda: say(f"stopped {child.stop()}"))
    asyncio.run(child.wait_ready())
    return child


def http(method: str, url: str, payload: Any = None, timeout: float = 30.0) -> bytes:
    """One request with the standard library; raises on any status >= 400."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body: bytes = answer.read()
    return body


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
