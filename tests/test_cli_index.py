"""``p2plb add / remove / get / list``: output, --json, exit codes, one-line errors;
through click's CliRunner and as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner, Result

from p2plb.cli import cli
from procs import Proc, Procs

FAST = ("--report-interval", "0.3s")


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    environment: dict[str, str | None] = {"P2PLB_BALANCERS": None, **(env or {})}
    return CliRunner().invoke(cli, list(args), env=environment)


def serving(balancer: Proc, n: int, within: float = 15.0) -> None:
    """Wait until the balancer lists ``n`` healthy indexers serving reads."""
    deadline = time.monotonic() + within
    while True:
        with urllib.request.urlopen(f"{balancer.url}/v1/routing-table") as answer:
            rows = json.load(answer)["indexers"]
        if sum(r["healthy"] and r["state"] == "serving" for r in rows) == n:
            return
        assert time.monotonic() < deadline, f"not {n} serving: {rows}"
        time.sleep(0.05)


@pytest.fixture
def indexer(procs: Procs) -> Proc:
    return procs.indexer("i1")


@pytest.fixture
def balancer(procs: Procs, indexer: Proc) -> Proc:
    balancer = procs.balancer("balancer")
    # The indexer already runs; a second one registers with this balancer.
    procs.indexer("i2", "--balancer", balancer.url, *FAST)
    serving(balancer, 1)
    return balancer


def test_add_get_list_remove_with_text_and_json(balancer: Proc) -> None:
    at = ("--balancer", balancer.url)

    added = run("add", "songs", "b", "a", *at)
    assert (added.exit_code, added.output) == (0, "added 2\n")
    again = run("add", "songs", "a", "--json", *at)
    assert (again.exit_code, json.loads(again.output)) == (0, {"added": 0})

    got = run("get", "songs", *at)
    assert (got.exit_code, got.output) == (0, "a\nb\n")
    as_json = run("get", "songs", "--json", *at)
    assert json.loads(as_json.output) == {"index": "songs", "items": ["a", "b"]}

    listed = run("list", env={"P2PLB_BALANCERS": balancer.url})
    assert (listed.exit_code, listed.output) == (0, "songs\n")
    listed = run("list", "--json", "--mode", "proxy", *at)
    assert json.loads(listed.output) == {"indices": ["songs"]}

    removed = run("remove", "songs", "a", "zz", *at)
    assert (removed.exit_code, removed.output) == (0, "removed 1\n")
    removed = run("remove", "songs", "b", "--json", "--mode", "proxy", *at)
    assert json.loads(removed.output) == {"removed": 1}


def test_control_characters_are_shown_escaped_one_item_per_line(
    balancer: Proc,
) -> None:
    at = ("--balancer", balancer.url)
    odd = ["\x1b[31mRED\x1b[0m", "line1\nline2"]
    assert run("add", "odd", *odd, *at).exit_code == 0

    got = run("get", "odd", *at)
    assert (got.exit_code, got.output) == (
        0,
        "\\x1b[31mRED\\x1b[0m\nline1\\nline2\n",
    )
    exact = run("get", "odd", "--json", *at)
    assert json.loads(exact.output)["items"] == sorted(odd)


def test_a_missing_index_exits_1_with_one_line(balancer: Proc) -> None:
    result = run("get", "nothing", "--balancer", balancer.url)
    assert (result.exit_code, result.stdout) == (1, "")
    assert (
        result.stderr == "p2plb: error: index 'nothing' not found (it has no items)\n"
    )

    as_json = run("get", "nothing", "--json", "--balancer", balancer.url)
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {"index": "nothing", "items": None}


def test_indexers_given_are_used_when_no_balancer_answers(indexer: Proc) -> None:
    added = run("add", "songs", "x", "--balancer", dead_url(), "--indexer", indexer.url)
    assert (added.exit_code, added.output) == (0, "added 1\n")

    alone = run("get", "songs", "--indexer", indexer.url)
    assert (alone.exit_code, alone.output) == (0, "x\n")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "a/b", "x"], 2, "INDEX: must not contain '/'"),
        (["add", "songs", "x", ""], 2, "ITEM: must not be empty"),
        (
            ["get", "songs", "--indexer", "nowhere"],
            2,
            "--indexer: must be http://host:port or https://host:port, got 'nowhere'",
        ),
        (
            ["list", "--balancer", "ftp://x:1"],
            2,
            "--balancer: must be http://host:port or https://host:port, got 'ftp://x:1'",
        ),
        (
            ["list", "--balancer", "{dead}"],
            1,
            "no balancer answered (balancer {dead}: cannot connect (connection "
            "refused)) and no indexers were given to call directly (with --indexer)",
        ),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(
    args: list[str], code: int, message: str
) -> None:
    dead = dead_url()
    args = [a.replace("{dead}", dead) for a in args]
    if "--balancer" not in args and "--indexer" not in args:
        args += ["--balancer", dead]

    result = run(*args)

    assert (result.exit_code, result.stdout) == (code, "")
    assert result.stderr == f"p2plb: error: {message.replace('{dead}', dead)}\n"


def test_missing_items_is_a_usage_error() -> None:
    result = run("add", "songs")
    assert result.exit_code == 2
    assert "Missing argument 'ITEM...'" in result.stderr


@pytest.mark.parametrize("command", ["add", "remove", "get", "list"])
def test_help_has_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output and f"p2plb {command} " in result.output
    assert "--balancer URL" in result.output and "--indexer URL" in result.output


def test_as_real_processes(balancer: Proc) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
    env["P2PLB_BALANCERS"] = balancer.url

    def p2plb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "p2plb", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )

    added = p2plb("add", "songs", "peer-17", "peer-3")
    assert (added.returncode, added.stdout, added.stderr) == (0, "added 2\n", "")
    got = p2plb("get", "songs")
    assert (got.returncode, got.stdout) == (0, "peer-17\npeer-3\n")
    listed = p2plb("list", "--json")
    assert json.loads(listed.stdout) == {"indices": ["songs"]}

    env["P2PLB_BALANCERS"] = dead_url()
    failed = p2plb("list")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("p2plb: error: no balancer answered")
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
