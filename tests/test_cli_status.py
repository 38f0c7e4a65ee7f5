"""``p2plb status`` and ``p2plb strategy``: exit codes and one-line errors, against
real balancers, dead ports and small fake balancers."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from p2plb.display import printable
from procs import Procs
from test_cli_index import dead_url, run
from test_tls import make_ca


@pytest.mark.parametrize("command", [["status"], ["strategy"], ["strategy", "p2c"]])
def test_an_unreachable_balancer_is_described_as_the_client_describes_it(
    command: list[str],
) -> None:
    dead = dead_url()

    result = run(*command, "--balancer", dead)

    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"p2plb: error: balancer {dead}: cannot connect (connection refused)\n"
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_a_private_ca_without_ca_file_gets_the_hint(
    procs: Procs, tmp_path: Path
) -> None:
    ca, cert, key = make_ca(tmp_path)
    balancer = procs.balancer(
        "balancer", "--tls-cert", str(cert), "--tls-key", str(key)
    )

    untrusting = run("status", "--balancer", balancer.url)
    reading = run("get", "songs", "--balancer", balancer.url)
    trusting = run("status", "--json", "--balancer", balancer.url, "--ca-file", str(ca))

    # One description for every command, naming only the flag.
    why = (
        f"balancer {balancer.url}: TLS certificate not trusted (unable to get "
        "local issuer certificate); pass the cluster's CA with --ca-file"
    )
    assert (untrusting.exit_code, untrusting.stdout) == (1, "")
    assert untrusting.stderr == f"p2plb: error: {why}\n"
    assert (reading.exit_code, reading.stdout) == (1, "")
    assert reading.stderr == (
        f"p2plb: error: no balancer answered ({why}) and no indexers were given "
        "to call directly (with --indexer)\n"
    )
    assert (trusting.exit_code, trusting.stderr) == (0, "")


class FakeBalancer:
    """Answers every request with ``status`` and the raw ``body`` set by the test."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, content_type="application/json"
        )


@pytest.fixture
def fake() -> Iterator[FakeBalancer]:
    """A fake balancer on its own loop, in a thread: the CLI runs its own loop."""
    balancer = FakeBalancer()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", balancer.handle)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    balancer.url = "http://127.0.0.1:{}".format(*runner.addresses[0][1:2])
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield balancer
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, nested(100_000), " answered HTTP 200 with a body that is not JSON, "
         "or nested too deeply to read"),
        (200, b'{"strategy": ' + nested(900) + b"}",
         " answered HTTP 200 with JSON nested more than 16 levels deep"),
        (200, b"[1, 2]", " answered HTTP 200 with no JSON object"),
        (200, b"<html>busy</html>", " answered HTTP 200 with a body that is not JSON, "
         "or nested too deeply to read"),
        (200, b'{"indexers": "many"}',
         " answered HTTP 200 with 'indexers' not a list of objects"),
        (200, b'{"indexers": [1]}',
         " answered HTTP 200 with 'indexers' not a list of objects"),
        (502, b'{"error": {"code": "x", "message": "down\\n\\u001b[2Jfor now"}}',
         " answered HTTP 502: down\\n\\x1b[2Jfor now"),
        (404, b'{"error": []}', ": HTTP 404"),
    ],
)  # fmt: skip
def test_a_status_that_cannot_be_shown_is_one_line(
    fake: FakeBalancer, status: int, body: bytes, error: str
) -> None:
    fake.status, fake.body = status, body

    result = run("status", "--balancer", fake.url)
    as_json = run("status", "--json", "--balancer", fake.url)

    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"p2plb: error: balancer {fake.url}{error}\n"
    assert (as_json.exit_code, as_json.stderr) == (1, result.stderr)
    # JSON holds the message as the balancer sent it; JSON escapes it itself.
    [shown] = json.loads(as_json.stdout)
    assert shown.keys() == {"balancer", "error"} and shown["balancer"] == fake.url
    assert printable(shown["error"]) == f"balancer {fake.url}{error}"


def table_rows(output: str) -> list[list[str]]:
    """The cells of each row of a rich table, stripped; borders left out."""
    return [
        [cell.strip() for cell in line.replace("┃", "│").split("│")[1:-1]]
        for line in output.splitlines()
        if line.startswith(("┃", "│"))
    ]


def test_values_of_any_type_are_shown_as_they_are(fake: FakeBalancer) -> None:
    row = {
        "id": 7, "address": ["http://x:1"], "healthy": "yes", "state": None,
        "current_load": "many", "capacity": {"n": 1}, "load_percentage": "x",
        "requests": 1.5, "routed": True, "errors": -1,
        "latency_ms": {"p50": "fast", "p99": 2}, "health_reason": "\x1b[2Jgone\n",
    }  # fmt: skip
    fake.body = json.dumps({"strategy": 3, "uptime_seconds": "long", "indexers": [
        row, {"latency_ms": "fast"}, {"healthy": False}
    ]}).encode()  # fmt: skip

    result = run("status", "--balancer", fake.url)

    assert (result.exit_code, result.stderr) == (0, "")
    title = result.stdout.splitlines()[0].rstrip()
    assert title == (
        f"{fake.url}  strategy=3  healthy=-/-  requests=-  routed=-  uptime=longs"
    )
    assert table_rows(result.stdout) == [
        ["id", "address", "health", "state", "load", "load %", "requests",
         "routed", "errors", "p50 ms", "p99 ms", "reason"],
        ["7", '["http://x:1"]', "yes", "-", 'many/{"n": 1}', "x", "1.5", "True",
         "-1", "fast", "2.0", "\\x1b[2Jgone\\n"],
        ["-", "-", "-", "-", "-/-", "-", "-", "-", "-", "-", "-", "-"],
        ["-", "-", "unhealthy", "-", "-/-", "-", "-", "-", "-", "-", "-", "-"],
    ]  # fmt: skip


def test_an_empty_status_is_an_empty_table(fake: FakeBalancer) -> None:
    result = run("status", "--balancer", fake.url)

    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.splitlines()[0].rstrip() == (
        f"{fake.url}  strategy=-  healthy=-/-  requests=-  routed=-  uptime=-s"
    )
    assert table_rows(result.stdout) == [
        ["id", "address", "health", "state", "load", "load %", "requests",
         "routed", "errors", "p50 ms", "p99 ms", "reason"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{}", "answered HTTP 200 with 'strategy' not a string"),
        (b'{"strategy": ["p2c"]}', "answered HTTP 200 with 'strategy' not a string"),
        (nested(5000), "answered HTTP 200 with a body that is not JSON, or nested "
         "too deeply to read"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", [["strategy"], ["strategy", "p2c"]])
def test_a_strategy_that_cannot_be_shown_is_one_line(
    fake: FakeBalancer, command: list[str], body: bytes, error: str
) -> None:
    fake.body = body

    result = run(*command, "--balancer", fake.url)

    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"p2plb: error: balancer {fake.url} {error}\n"


def test_a_strategy_name_is_shown_escaped(fake: FakeBalancer) -> None:
    fake.body = b'{"strategy": "p2c\\u001b[2J"}'

    result = run("strategy", "--balancer", fake.url)

    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == f"{fake.url}  p2c\\x1b[2J\n"


def test_status_exits_1_when_one_balancer_of_two_fails(fake: FakeBalancer) -> None:
    dead = dead_url()
    fake.body = b'{"strategy": "p2c", "indexers": []}'
    both = ("--balancer", fake.url, "--balancer", dead)

    result = run("status", *both)
    as_json = run("status", "--json", *both)

    failure = f"balancer {dead}: cannot connect (connection refused)"
    assert (result.exit_code, result.stderr) == (1, f"p2plb: error: {failure}\n")
    assert result.stdout.splitlines()[0].rstrip() == (
        f"{fake.url}  strategy=p2c  healthy=-/-  requests=-  routed=-  uptime=-s"
    )
    assert (as_json.exit_code, as_json.stderr) == (1, result.stderr)
    assert json.loads(as_json.stdout) == [
        {"balancer": fake.url, "status": {"strategy": "p2c", "indexers": []}},
        {"balancer": dead, "error": failure},
    ]


@pytest.mark.parametrize("command", ["status", "strategy"])
def test_help_gives_the_exit_code(command: str) -> None:
    result = run(command, "--help")

    assert result.exit_code == 0
    assert (
        "Exit code 1 when a balancer given did not answer or answered an error; "
        "what the others answered is still shown."
    ) in " ".join(result.output.split())  # as click wraps it
