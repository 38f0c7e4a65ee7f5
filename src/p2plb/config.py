"""Settings of the p2plb servers, from flags, environment and a TOML file.

Every setting is declared once, as a ``Setting`` in ``INDEXER_SETTINGS`` or
``BALANCER_SETTINGS``.  The CLI turns each into a flag; its environment variable is
``P2PLB_`` and the flag's name in capitals with ``-`` as ``_``; its key in the TOML
file given by ``--config`` is the flag's name with ``-`` or ``_``, at the top level
or in a ``[indexer]`` / ``[balancer]`` table (the table wins).  A flag beats the
environment, which beats the file, which beats the default.

Parsing and validation live here and nowhere else, so a bad value reads the same
whichever way it came in: ``ConfigError`` with the flag's name and what was wrong.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2plb.errors import ConfigError, RequestError
from p2plb.wire import check_address, check_indexer_id
from p2plb.workload import parse_antagonist

__all__ = [
    "BALANCER_SETTINGS",
    "INDEXER_SETTINGS",
    "STRATEGY_NAMES",
    "BalancerConfig",
    "IndexerConfig",
    "Setting",
    "build_config",
    "env_name",
    "parse_duration",
    "read_config_file",
]

STRATEGY_NAMES = (
    "least_load",
    "round_robin",
    "random",
    "p2c",
    "least_latency",
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kib|mib|gib|kb|mb|gb)?\s*$", re.IGNORECASE)
_SIZE_BYTES = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from ``10``, ``2.5``, ``500ms``, ``10s``, ``5m``, ``1h`` or ``1d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 10s, 500ms or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(
                f"expected a duration like 10s, 500ms or 1h, got {value!r}"
            )
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    return seconds


def _parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size like 1048576, 512KiB or 1MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(
                f"expected a size like 1048576, 512KiB or 1MiB, got {value!r}"
            )
        size = int(match.group(1)) * _SIZE_BYTES[(match.group(2) or "b").lower()]
    if size < 1:
        raise ValueError(f"must be at least 1 byte, got {value!r}")
    return size


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, (bool, float)):
            raise ValueError(f"expected a whole number, got {value!r}")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ValueError(f"must be at least {minimum}{upper}, got {number}")
        return number

    return parse


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_text(value: object) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _parse_list(value: object) -> tuple[str, ...]:
    """A list from TOML, repeated flags, or one string split on commas and spaces."""
    if isinstance(value, str):
        parts: Sequence[object] = re.split(r"[,\s]+", value)
    elif isinstance(value, list | tuple):
        parts = [p for item in value for p in re.split(r"[,\s]+", str(item))]
    else:
        raise ValueError(f"expected a list of addresses, got {value!r}")
    return tuple(str(p) for p in parts if str(p))


def _parse_url(value: object) -> str:
    return check_address(str(value).strip(), field="address")


def _parse_urls(value: object) -> tuple[str, ...]:
    return tuple(_parse_url(v) for v in _parse_list(value))


def _parse_strategy(value: object) -> str:
    name = str(value).strip()
    if name not in STRATEGY_NAMES:
        raise ValueError(f"must be one of {', '.join(STRATEGY_NAMES)}; got {name!r}")
    return name


def _parse_log_level(value: object) -> str:
    level = str(value).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be debug, info, warning or error; got {value!r}")
    return level


def _parse_id(value: object) -> str:
    return check_indexer_id(str(value), field="id")


@dataclass(frozen=True)
class Setting:
    """One setting: its flag, how to read it, its default and its help text."""

    name: str
    parse: Callable[[object], Any]
    default: Any
    help: str
    many: bool = False
    flag_only: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def env_name(setting: Setting) -> str:
    return "P2PLB_" + setting.name.upper()


_COMMON = (
    Setting("host", _parse_text, "127.0.0.1", "Address to listen on."),
    Setting(
        "max_body_size",
        _parse_size,
        1024 * 1024,
        "Largest request body accepted (bytes, or 512KiB, 1MiB); larger gets 413.",
    ),
    Setting(
        "shutdown_timeout",
        parse_duration,
        10.0,
        "How long in-flight requests may take to finish on SIGTERM or SIGINT.",
    ),
    Setting(
        "idle_timeout",
        parse_duration,
        75.0,
        "How long a connection may stay open without a whole request: idle "
        "between requests, or still sending its request line and headers.",
    ),
    Setting(
        "body_timeout",
        parse_duration,
        30.0,
        "How long a client may take to send a request body once its headers "
        "arrived; slower gets 408, so a trickled body cannot hold a slot.",
    ),
    Setting(
        "cluster_token",
        _parse_text,
        None,
        "Token that nodes of the cluster present to each other.",
    ),
    Setting(
        "admin_token",
        _parse_text,
        None,
        "Token required to change the strategy or remove another indexer.",
    ),
    Setting(
        "insecure",
        _parse_bool,
        False,
        "Allow listening beyond loopback without tokens.",
    ),
    Setting("tls_cert", _parse_text, None, "Certificate (PEM) to serve HTTPS with."),
    Setting("tls_key", _parse_text, None, "Private key (PEM) of --tls-cert."),
    Setting(
        "ca_file",
        _parse_text,
        None,
        "CA bundle to verify https:// peers with (default: the system's).",
    ),
    Setting("log_level", _parse_log_level, "INFO", "debug, info, warning or error."),
)

INDEXER_SETTINGS: tuple[Setting, ...] = (
    Setting("id", _parse_id, None, "Unique id of this indexer (required)."),
    *_COMMON,
    Setting("port", _int_at_least(0, 65535), 7401, "Port to listen on (0: any)."),
    Setting(
        "advertise_url",
        _parse_url,
        None,
        "Address given to balancers and peers (default: the bound host and port).",
    ),
    Setting(
        "data_dir",
        _parse_text,
        None,
        "Directory of the SQLite database (default: ./p2plb-data/ID).",
    ),
    Setting(
        "capacity",
        _int_at_least(1),
        64,
        "Index requests served at once; more wait in a short queue.",
    ),
    Setting(
        "queue_limit",
        _int_at_least(0),
        None,
        "Index requests that may wait beyond capacity before 503 (default: capacity).",
    ),
    Setting(
        "balancer",
        _parse_urls,
        (),
        "Balancer to register with; repeat for several.",
        many=True,
    ),
    Setting(
        "report_interval",
        parse_duration,
        10.0,
        "How often to report load to each balancer (heartbeat).",
    ),
    Setting(
        "drain_period",
        parse_duration,
        2.0,
        "How long to keep serving after unregistering on shutdown.",
    ),
    Setting(
        "peer",
        _parse_urls,
        (),
        "Another indexer to replicate with, besides those the balancers list.",
        many=True,
    ),
    Setting(
        "sync_timeout",
        parse_duration,
        10.0,
        "On start, serve anyway if no serving peer helped catch up by then.",
    ),
    Setting(
        "write_timeout",
        parse_duration,
        2.0,
        "How long a write waits for a second copy before 503 insufficient_replicas.",
    ),
    Setting(
        "read_wait",
        parse_duration,
        1.0,
        "How long a read waits to catch up to P2PLB-Min-Version before 503.",
    ),
    Setting(
        "anti_entropy_interval",
        parse_duration,
        3.0,
        "How often digests are compared with a random peer.",
    ),
    Setting(
        "tombstone_grace",
        parse_duration,
        86400.0,
        "Removals are remembered at least this long; an indexer away longer "
        "resyncs from scratch.",
    ),
    Setting(
        "service_time",
        parse_duration,
        None,
        "Benchmarks only: each index request also takes an exponential time "
        "with this mean.",
    ),
    Setting(
        "antagonist",
        parse_antagonist,
        None,
        "Benchmarks only: FACTOR/PERIOD, e.g. 5/5s: service is FACTOR times "
        "slower every other PERIOD.",
    ),
    Setting(
        "membership_interval",
        parse_duration,
        1.0,
        "How often the list of registered indexers is fetched from a balancer.",
    ),
)

BALANCER_SETTINGS: tuple[Setting, ...] = (
    *_COMMON,
    Setting("port", _int_at_least(0, 65535), 7400, "Port to listen on (0: any)."),
    Setting(
        "state_file",
        _parse_text,
        "p2plb-balancer-state.json",
        "Where the registry, strategy and counters are saved.",
    ),
    Setting("strategy", _parse_strategy, "least_load", ", ".join(STRATEGY_NAMES)),
    Setting(
        "unhealthy_after",
        parse_duration,
        60.0,
        "An indexer with no load report for this long is unhealthy.",
    ),
    Setting(
        "forget_after",
        parse_duration,
        3600.0,
        "An unhealthy indexer is removed from the registry after this long.",
    ),
    Setting(
        "persist_interval",
        parse_duration,
        30.0,
        "How often the state is saved (also on clean shutdown).",
    ),
    Setting(
        "probe_interval",
        parse_duration,
        2.0,
        "How often each indexer's /healthz is probed.",
    ),
    Setting(
        "probe_timeout",
        parse_duration,
        1.0,
        "How long a probe of /healthz may take before it counts as failed.",
    ),
    Setting(
        "probe_rise",
        _int_at_least(1),
        2,
        "Successful probes in a row that make an unhealthy indexer healthy.",
    ),
    Setting(
        "probe_fall",
        _int_at_least(1),
        2,
        "Failed probes in a row that make a healthy indexer unhealthy.",
    ),
    Setting(
        "eject_for",
        parse_duration,
        10.0,
        "How long an indexer is left out after proxied requests to it failed "
        "3 times in a row; doubled each time it fails again on probation.",
    ),
    Setting(
        "proxy_timeout",
        parse_duration,
        10.0,
        "How long a proxied request may take at one indexer before it is retried.",
    ),
    Setting(
        "proxy_retries",
        _int_at_least(0),
        2,
        "Further indexers a failed proxied request is tried on.",
    ),
    Setting(
        "proxy_keepalive",
        parse_duration,
        30.0,
        "How long the proxy keeps an idle connection to an indexer; keep it "
        "below the indexers' --idle-timeout, so that the proxy closes it first.",
    ),
)


@dataclass(frozen=True)
class _ServerConfig:
    host: str
    port: int
    max_body_size: int
    shutdown_timeout: float
    idle_timeout: float
    body_timeout: float
    cluster_token: str | None
    admin_token: str | None
    insecure: bool
    tls_cert: str | None
    tls_key: str | None
    ca_file: str | None
    log_level: str


@dataclass(frozen=True)
class IndexerConfig(_ServerConfig):
    id: str
    advertise_url: str | None
    data_dir: str
    capacity: int
    queue_limit: int
    balancer: tuple[str, ...]
    report_interval: float
    drain_period: float
    peer: tuple[str, ...]
    sync_timeout: float
    write_timeout: float
    read_wait: float
    anti_entropy_interval: float
    tombstone_grace: float
    service_time: float | None
    antagonist: tuple[float, float] | None
    membership_interval: float


@dataclass(frozen=True)
class BalancerConfig(_ServerConfig):
    state_file: str
    strategy: str
    unhealthy_after: float
    forget_after: float
    persist_interval: float
    probe_interval: float
    probe_timeout: float
    probe_rise: int
    probe_fall: int
    eject_for: float
    proxy_timeout: float
    proxy_retries: int
    proxy_keepalive: float
    # Whether --strategy (or its variable or key) was given rather than the
    # default: a strategy restored from the state file wins either way
    # (design.md), but one given explicitly is then worth a warning.
    strategy_given: bool = False


_SETTING_NAMES = {s.name for s in (*INDEXER_SETTINGS, *BALANCER_SETTINGS)}


def read_config_file(path: str | Path, section: str) -> dict[str, Any]:
    """The keys of a TOML file that apply to ``section`` ("indexer" or "balancer")."""
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
        raise ConfigError(
            f"--config: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc

    values: dict[str, Any] = {}
    for key, value in document.items():
        if not isinstance(value, dict):
            values[key.replace("-", "_")] = value
        elif key not in ("indexer", "balancer"):
            raise ConfigError(
                f"--config: unknown table [{key}] in {path}; "
                "use [indexer] or [balancer]"
            )
    # Both tables are checked whichever server reads the file: a key in the
    # wrong table would otherwise be ignored without a word by both.
    for name, settings in (
        ("indexer", INDEXER_SETTINGS),
        ("balancer", BALANCER_SETTINGS),
    ):
        table = document.get(name, {})
        if not isinstance(table, dict):
            if name in _SETTING_NAMES:
                continue  # a top-level setting: the indexer's --balancer
            raise ConfigError(f"--config: [{name}] in {path} must be a table")
        known = {s.name for s in settings}
        for key in table:
            if key.replace("-", "_") not in known:
                raise ConfigError(
                    f"--config: unknown setting {key!r} in [{name}] of {path}"
                )
    table = document.get(section, {})
    for key, value in table.items() if isinstance(table, dict) else ():
        values[key.replace("-", "_")] = value
    return values


def _resolve(
    settings: Sequence[Setting],
    given: Mapping[str, Any],
    from_file: Mapping[str, Any],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    known = {s.name for s in settings}
    unknown = sorted(set(from_file) - known - _OTHER_SECTION_KEYS)
    if unknown:
        raise ConfigError(f"--config: unknown setting {unknown[0]!r}")

    values: dict[str, Any] = {}
    for setting in settings:
        raw = given.get(setting.name)
        label = labels.get(setting.name, setting.flag)
        if raw is None or (setting.many and not raw):
            raw = from_file.get(setting.name)
            label = f"{setting.name} (in --config)"
        if raw is None or (setting.many and not raw):
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        except RequestError as exc:
            # The shared checks name the wire field ("address: ..."); name the flag.
            reason = exc.message.split(": ", 1)[-1]
            raise ConfigError(f"{label}: {reason}") from None
    return values


# Keys that belong to the other server kind may sit at the top level of a shared file.
_OTHER_SECTION_KEYS = {s.name for s in (*INDEXER_SETTINGS, *BALANCER_SETTINGS)}


def _check_exposure(values: Mapping[str, Any], *, needs_admin: bool) -> None:
    """Refuse a non-loopback listener without tokens, unless --insecure says so."""
    host = values["host"]
    tokens = values["cluster_token"] and (values["admin_token"] or not needs_admin)
    if values["insecure"] or tokens:
        return
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"--host: refusing to listen on {host} without "
            + (
                "--cluster-token and --admin-token"
                if needs_admin
                else "--cluster-token"
            )
            + ", since anyone who reaches it could change the cluster; set the "
            "token, or pass --insecure on a trusted network"
        )


def build_config(
    kind: str,
    given: Mapping[str, Any],
    from_file: Mapping[str, Any] | None = None,
    *,
    labels: Mapping[str, str] | None = None,
) -> IndexerConfig | BalancerConfig:
    """Validate flag/environment values over file values over defaults.

    ``labels`` names where a given value came from when it was not a flag (an
    environment variable), for the error that refuses it.
    """
    file_values = from_file or {}
    names = labels or {}
    if kind == "indexer":
        values = _resolve(INDEXER_SETTINGS, given, file_values, names)
        if values["id"] is None:
            raise ConfigError("--id: an indexer needs an id (or P2PLB_ID)")
        if values["data_dir"] is None:
            values["data_dir"] = str(Path("p2plb-data") / values["id"])
        if values["queue_limit"] is None:
            values["queue_limit"] = values["capacity"]
        _check_exposure(values, needs_admin=False)
        return IndexerConfig(**values)
    if kind == "balancer":
        values = _resolve(BALANCER_SETTINGS, given, file_values, names)
        _check_exposure(values, needs_admin=True)
        if values["forget_after"] < values["unhealthy_after"]:
            raise ConfigError(
                "--forget-after: must not be shorter than --unhealthy-after "
                f"({values['forget_after']:g}s < {values['unhealthy_after']:g}s)"
            )
        given_strategy = given.get("strategy") or file_values.get("strategy")
        return BalancerConfig(**values, strategy_given=given_strategy is not None)
    raise ValueError(f"unknown server kind {kind!r}")
