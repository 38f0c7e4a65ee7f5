"""A command-line error names what the user gave: a flag, an environment
variable or an argument, never the name of a library argument behind it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2plb.cli import cli
from test_cli_index import dead_url

NOT_A_URL = "must be http://host:port or https://host:port, got 'ftp://x:1'"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["add", "songs", ""], {}, "ITEM: must not be empty"),
        (["add", "songs", "x", "y" * 4097], {},
         "ITEM: must be at most 4096 bytes of UTF-8, got 4097"),
        (["remove", "songs", "a\x00b"], {}, "ITEM: must not contain NUL characters"),
        (["get", ""], {}, "INDEX: must not be empty"),
        (["list", "--ca-file", "{missing}"], {}, "--ca-file: no such file: {missing}"),
        (["list"], {"P2PLB_CA_FILE": "{missing}"},
         "P2PLB_CA_FILE: no such file: {missing}"),
        (["status", "--ca-file", "{missing}"], {},
         "--ca-file: no such file: {missing}"),
        (["strategy"], {"P2PLB_CA_FILE": "{missing}"},
         "P2PLB_CA_FILE: no such file: {missing}"),
        (["list"], {"P2PLB_BALANCERS": "ftp://x:1"}, f"P2PLB_BALANCERS: {NOT_A_URL}"),
        (["status"], {"P2PLB_BALANCERS": " , "},
         "P2PLB_BALANCERS: give at least one balancer URL"),
        (["simulate", "--strategy", "fastest"], {},
         "--strategy: must be among least_load, round_robin, random, p2c, "
         "least_latency, unweighted_rr, ideal_jsq, central_queue; got 'fastest'"),
        (["simulate", "--report-interval", "0"], {},
         "--report-interval: must be > 0; got 0.0"),
    ],
)  # fmt: skip
def test_an_error_names_what_the_user_gave(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    missing = str(tmp_path / "ca.pem")
    environment: dict[str, str | None] = {
        "P2PLB_BALANCERS": dead_url(),  # reached only if a check were missing
        "P2PLB_CA_FILE": None,
    }
    environment |= {k: v.replace("{missing}", missing) for k, v in env.items()}

    result = CliRunner().invoke(
        cli, [a.replace("{missing}", missing) for a in args], env=environment
    )

    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"p2plb: error: {message.replace('{missing}', missing)}\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--capacities", "1,two"],
         "--capacities: expected whole numbers separated by commas, got '1,two'"),
        (["--service-time", "soon"],
         "--service-time: expected a duration like 10s, 500ms or 1h, got 'soon'"),
    ],
)  # fmt: skip
def test_bench_names_its_flags(flags: list[str], message: str) -> None:
    # A process: bench configures logging, which would outlive a CliRunner call.
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
    result = subprocess.run(
        [sys.executable, "-m", "p2plb", "bench", "--no-haproxy", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"p2plb: error: {message}\n"
