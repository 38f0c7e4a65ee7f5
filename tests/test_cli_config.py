"""Server settings given on the command line: errors name what the user typed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2plb.cli import cli


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["balancer"],
            {"P2PLB_INSECURE": "maybe"},
            "P2PLB_INSECURE: expected true or false, got 'maybe'",
        ),
        (
            ["indexer", "--id", "a"],
            {"P2PLB_CAPACITY": "x"},
            "P2PLB_CAPACITY: expected a whole number, got 'x'",
        ),
        (
            ["indexer", "--id", "a", "--capacity", "x"],
            {},
            "--capacity: expected a whole number, got 'x'",
        ),
        (
            ["indexer", "--id", "x\n"],
            {},
            "--id: must be 1 to 128 of letters, digits, '.', '_', ':', '-'; got 'x\\n'",
        ),
        (
            ["indexer", "--id", ".."],
            {},
            "--id: must not be '..', which a URL path drops as a dot segment",
        ),
        (
            ["balancer", "--probe-interval", "soon"],
            {"P2PLB_PROBE_INTERVAL": "1s"},
            "--probe-interval: expected a duration like 10s, 500ms or 1h, got 'soon'",
        ),
    ],
)
def test_a_bad_value_is_named_as_it_was_given(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = CliRunner().invoke(cli, [*args, "--print-config"], env=env)
    assert (result.exit_code, result.output) == (2, f"p2plb: error: {message}\n")


def test_a_bad_value_in_the_config_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "p2plb.toml"
    path.write_text('[indexer]\ncapacity = "x"\n')
    result = CliRunner().invoke(
        cli, ["indexer", "--id", "a", "--config", str(path), "--print-config"]
    )
    assert (result.exit_code, result.output) == (
        2,
        "p2plb: error: capacity (in --config): expected a whole number, got 'x'\n",
    )


@pytest.mark.parametrize("command", [["indexer", "--id", "a"], ["balancer"]])
def test_a_key_in_the_wrong_table_is_refused_by_both(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "p2plb.toml"
    path.write_text("[indexer]\ncapacity = 8\n[balancer]\ncapacity = 0\n")
    result = CliRunner().invoke(
        cli, [*command, "--config", str(path), "--print-config"]
    )
    assert (result.exit_code, result.output) == (
        2,
        f"p2plb: error: --config: unknown setting 'capacity' in [balancer] of {path}\n",
    )


def test_a_config_path_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["balancer", "--config", str(tmp_path), "--print-config"]
    )
    assert (result.exit_code, result.output) == (
        2,
        f"p2plb: error: --config: cannot read {tmp_path}: Is a directory\n",
    )


@pytest.mark.parametrize("value", ["1", "true", "on", "yes"])
def test_a_switch_can_be_set_by_its_variable(value: str) -> None:
    result = CliRunner().invoke(
        cli, ["balancer", "--print-config"], env={"P2PLB_INSECURE": value}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["insecure"] is True


def test_the_flag_beats_the_variable_for_a_switch() -> None:
    result = CliRunner().invoke(
        cli, ["balancer", "--insecure", "--print-config"], env={"P2PLB_INSECURE": "no"}
    )
    assert json.loads(result.output)["insecure"] is True
    result = CliRunner().invoke(
        cli, ["balancer", "--print-config"], env={"P2PLB_INSECURE": "no"}
    )
    assert json.loads(result.output)["insecure"] is False


def test_print_config_shows_settings_not_how_they_were_given() -> None:
    result = CliRunner().invoke(
        cli, ["balancer", "--strategy", "p2c", "--print-config"]
    )
    shown = json.loads(result.output)
    assert shown["strategy"] == "p2c"
    assert "strategy_given" not in shown
    assert shown["proxy_keepalive"] == 30.0


@pytest.mark.parametrize(
    ("args", "needed"),
    [
        (["balancer"], "--cluster-token and --admin-token"),
        (["balancer", "--cluster-token", "c"], "--cluster-token and --admin-token"),
        (["indexer", "--id", "i1"], "--cluster-token"),
    ],
)
def test_a_server_without_tokens_will_not_listen_beyond_loopback(
    args: list[str], needed: str, tmp_path: Path
) -> None:
    # A real process, so nothing between the command line and the socket
    # lets it through.
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PLB_")}
    done = subprocess.run(
        [sys.executable, "-m", "p2plb", *args, "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr == (
        f"p2plb: error: --host: refusing to listen on 0.0.0.0 without {needed}, "
        "since "
        "anyone who reaches it could change the cluster; set the token, or pass "
        "--insecure on a trusted network\n"
    )
    assert list(tmp_path.iterdir()) == []  # no state file, no data directory
