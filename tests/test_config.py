from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2plb.cli import cli
from p2plb.config import BalancerConfig, IndexerConfig, build_config, parse_duration
from p2plb.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10", 10.0),
        ("2.5", 2.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (" 3 s ", 3.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "expected a duration like 10s, 500ms or 1h, got 'abc'"),
        ("10 parsecs", "expected a duration like 10s, 500ms or 1h, got '10 parsecs'"),
        ("-1s", "expected a duration like 10s, 500ms or 1h, got '-1s'"),
        ("0", "must be a positive duration, got '0'"),
        (True, "expected a duration like 10s, 500ms or 1h"),
    ],
)
def test_parse_duration_rejects(text: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


def test_indexer_defaults_match_design() -> None:
    config = build_config("indexer", {"id": "i1"})
    assert isinstance(config, IndexerConfig)
    assert (config.host, config.port, config.capacity) == ("127.0.0.1", 7401, 64)
    assert config.report_interval == 10.0
    assert config.max_body_size == 1024 * 1024
    assert config.queue_limit == 64
    assert config.data_dir == str(Path("p2plb-data") / "i1")


def test_balancer_defaults_match_design() -> None:
    config = build_config("balancer", {})
    assert isinstance(config, BalancerConfig)
    assert (config.host, config.port, config.strategy) == (
        "127.0.0.1",
        7400,
        "least_load",
    )
    assert (config.unhealthy_after, config.forget_after) == (60.0, 3600.0)
    assert config.persist_interval == 30.0


@pytest.mark.parametrize(
    ("kind", "given", "message"),
    [
        ("indexer", {}, "--id: an indexer needs an id (or P2PLB_ID)"),
        (
            "indexer",
            {"id": "a b"},
            "--id: must be 1 to 128 of letters, digits, '.', '_', ':', '-'; got 'a b'",
        ),
        (
            "indexer",
            {"id": "i", "capacity": "0"},
            "--capacity: must be at least 1, got 0",
        ),
        (
            "indexer",
            {"id": "i", "capacity": "many"},
            "--capacity: expected a whole number, got 'many'",
        ),
        (
            "indexer",
            {"id": "i", "port": "70000"},
            "--port: must be at least 0 and at most 65535, got 70000",
        ),
        (
            "indexer",
            {"id": "i", "max_body_size": "1XB"},
            "--max-body-size: expected a size like 1048576, 512KiB or 1MiB, got '1XB'",
        ),
        (
            "indexer",
            {"id": "i", "balancer": ("127.0.0.1:7400",)},
            "--balancer: must be http://host:port or https://host:port, "
            "got '127.0.0.1:7400'",
        ),
        (
            "indexer",
            {"id": "i", "host": "0.0.0.0"},
            "--host: refusing to listen on 0.0.0.0 without --cluster-token, since "
            "anyone who reaches it could change the cluster; set the token, or pass "
            "--insecure on a trusted network",
        ),
        (
            "balancer",
            {"strategy": "fastest"},
            "--strategy: must be one of least_load, round_robin, random, p2c, "
            "least_latency; got 'fastest'",
        ),
        (
            "balancer",
            {"unhealthy_after": "2m", "forget_after": "1m"},
            "--forget-after: must not be shorter than --unhealthy-after (60s < 120s)",
        ),
        (
            "balancer",
            {"log_level": "loud"},
            "--log-level: must be debug, info, warning or error; got 'loud'",
        ),
    ],
)
def test_bad_settings_name_the_flag(
    kind: str, given: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(kind, given)
    assert str(info.value) == message


def test_insecure_or_tokens_allow_a_public_listener() -> None:
    assert build_config("indexer", {"id": "i", "host": "0.0.0.0", "insecure": True})
    tokens = {"cluster_token": "c", "admin_token": "a", "host": "::"}
    assert build_config("balancer", tokens)
    with pytest.raises(ConfigError, match="--cluster-token and --admin-token"):
        build_config("balancer", {"host": "::", "cluster_token": "c"})


def resolved(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    result = CliRunner().invoke(cli, [*args, "--print-config"], env=env)
    assert result.exit_code == 0, result.output
    loaded: dict[str, object] = json.loads(result.output)
    return loaded


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "p2plb.toml"
    config.write_text(
        'capacity = 3\nreport-interval = "4s"\n'
        '[indexer]\nid = "from-file"\nport = 9000\nqueue_limit = 5\n'
        "[balancer]\nport = 1\n"
    )
    args = ["indexer", "--config", str(config), "--port", "9100"]
    env = {"P2PLB_PORT": "9200", "P2PLB_CAPACITY": "7", "P2PLB_CLUSTER_TOKEN": "s3"}

    shown = resolved(args, env)

    assert shown["port"] == 9100  # flag over environment and file
    assert shown["capacity"] == 7  # environment over file
    assert shown["id"] == "from-file"  # [indexer] table
    assert shown["report_interval"] == 4.0  # top level of the file
    assert shown["queue_limit"] == 5
    assert shown["cluster_token"] == "<hidden>"


def test_repeated_and_listed_balancers() -> None:
    shown = resolved(
        ["indexer", "--id", "i", "--balancer", "http://a:1", "--balancer", "http://b:2"]
    )
    assert shown["balancer"] == ["http://a:1", "http://b:2"]
    shown = resolved(
        ["indexer", "--id", "i"], {"P2PLB_BALANCER": "http://a:1,http://b:2"}
    )
    assert shown["balancer"] == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("port = ", "p2plb: error: --config: {path} is not valid TOML: "),
        ("colour = 1", "p2plb: error: --config: unknown setting 'colour'"),
        ("indexer = 1", "p2plb: error: --config: [indexer] in {path} must be a table"),
        (
            b"\xff\xfe",
            "p2plb: error: --config: {path} is not UTF-8 text (invalid start byte at "
            "byte 0)\n",
        ),
    ],
)
def test_bad_config_file(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "bad.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = CliRunner().invoke(cli, ["indexer", "--id", "i", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output.startswith(message.format(path=path))
    assert "Traceback" not in result.output


def test_the_indexers_balancer_may_be_a_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "shared.toml"
    path.write_text('balancer = "http://127.0.0.1:7400"\nid = "i9"\n')
    shown = resolved(["indexer", "--config", str(path)])
    assert (shown["balancer"], shown["id"]) == (["http://127.0.0.1:7400"], "i9")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "none.toml"
    result = CliRunner().invoke(cli, ["indexer", "--id", "i", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output == (
        f"p2plb: error: --config: cannot read {path}: No such file or directory\n"
    )


def test_cli_reports_bad_flag_in_one_line() -> None:
    result = CliRunner().invoke(cli, ["indexer", "--id", "i", "--capacity", "-3"])
    assert result.exit_code == 2
    assert result.output == "p2plb: error: --capacity: must be at least 1, got -3\n"


@pytest.mark.parametrize("command", [[], ["indexer"]])
def test_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage: " in result.output


def test_a_misspelled_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p2plb.toml"
    path.write_text("[balancr]\nport = 7690\n")
    result = CliRunner().invoke(cli, ["balancer", "--config", str(path)])
    assert (result.exit_code, result.output) == (
        2,
        f"p2plb: error: --config: unknown table [balancr] in {path}; "
        "use [indexer] or [balancer]\n",
    )
