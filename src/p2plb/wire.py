"""What travels over HTTP: request bodies, their validation, and shared checks.

Rules of this module:

* Public request bodies (the index API, strategy changes) reject unknown fields;
  messages between p2plb nodes ignore them and carry ``"protocol": 1``, so a newer
  node can add fields without breaking an older one.
* Every rejection is a ``RequestError`` with the code of design.md and a message
  that starts with the name of the field at fault, so a caller can act on it.
* Names, items, ids and addresses are checked here and only here; servers, the
  client and the config all call these functions.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Annotated, Any, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

import msgspec

from p2plb.errors import RequestError
from p2plb.servicetime import MAX_SERVICE_MS

__all__ = [
    "MAX_ITEM_BYTES",
    "MAX_NAME_CHARS",
    "PROTOCOL",
    "ItemsBody",
    "check_address",
    "check_indexer_id",
    "check_item",
    "check_items",
    "check_name",
    "check_whole_number",
    "decode_body",
    "decode_percent",
    "encode",
    "invalid",
]

PROTOCOL = 1
MAX_NAME_CHARS = 256
MAX_ITEM_BYTES = 4096
# A batch is bounded by the body size limit too; this keeps one request's work
# (and the transaction it becomes) small enough to not stall other writers.
MAX_BATCH_ITEMS = 10_000

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def invalid(field: str, reason: str) -> RequestError:
    return RequestError(400, "invalid_field", f"{field}: {reason}")


class ItemsBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Body of add and remove: one ``item`` or a batch of ``items``."""

    item: str | msgspec.UnsetType = msgspec.UNSET
    items: list[str] | msgspec.UnsetType = msgspec.UNSET

    def values(self) -> list[str]:
        if isinstance(self.item, str) == isinstance(self.items, list):
            raise invalid("item", 'give exactly one of "item" or "items"')
        if isinstance(self.item, str):
            return [check_item(self.item, field="item")]
        assert isinstance(self.items, list)
        return check_items(self.items)


_FIELD_PATH = re.compile(r"- at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def decode_body(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into ``kind``, turning every failure into a 400."""
    if not body.strip():
        raise RequestError(
            400, "invalid_json", "body: expected a JSON object, got nothing"
        )
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc)) from None
    except RecursionError:
        # msgspec gives up on deep nesting, even inside a field it skips.
        raise RequestError(
            400, "invalid_json", "body: not valid JSON (nested too deeply)"
        ) from None
    except msgspec.DecodeError as exc:
        reason = str(exc)
        if _SURROGATE_ESCAPE.search(body):
            # msgspec calls a lone surrogate escape "truncated"; say what it is.
            reason = "it holds a \\u escape of a lone surrogate, which is not UTF-8"
        raise RequestError(
            400, "invalid_json", f"body: not valid JSON ({reason})"
        ) from None


def _validation_error(text: str) -> RequestError:
    unknown = _UNKNOWN.search(text)
    if unknown:
        name = unknown.group(1)
        return RequestError(400, "unknown_field", f"{name}: unknown field")
    missing = _MISSING.search(text)
    if missing:
        return invalid(missing.group(1), "required field is missing")
    path = _FIELD_PATH.search(text)
    field = path.group(1) if path and path.group(1) else "body"
    field = re.sub(r"\[\d+\]$", "", field) or "body"
    reason = text.split(" - at ")[0]
    if field == "body" and "Expected `object`" in reason:
        return RequestError(
            400, "invalid_json", f"body: expected a JSON object ({reason})"
        )
    return invalid(field, reason[0].lower() + reason[1:])


def _check_utf8(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(
            field, "must be valid UTF-8 (it holds a lone surrogate)"
        ) from None


def check_name(name: str, *, field: str = "name") -> str:
    """An index name: 1 to 256 characters, no control characters, no ``/``."""
    if not name:
        raise invalid(field, "must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise invalid(
            field, f"must be at most {MAX_NAME_CHARS} characters, got {len(name)}"
        )
    _check_utf8(name, field)
    if "/" in name:
        raise invalid(field, "must not contain '/'")
    _check_no_control(name, field)
    return name


def _check_no_control(value: str, field: str) -> None:
    for char in value:
        if unicodedata.category(char) == "Cc":
            raise invalid(
                field, f"must not contain control characters (found {char!r})"
            )


def check_item(item: str, *, field: str = "item") -> str:
    """An item: 1 to 4096 bytes of UTF-8, without NUL."""
    if not item:
        raise invalid(field, "must not be empty")
    _check_utf8(item, field)
    size = len(item.encode("utf-8"))
    if size > MAX_ITEM_BYTES:
        raise invalid(
            field, f"must be at most {MAX_ITEM_BYTES} bytes of UTF-8, got {size}"
        )
    if "\x00" in item:
        raise invalid(field, "must not contain NUL characters")
    return item


def check_items(items: list[str]) -> list[str]:
    if not items:
        raise invalid("items", "must hold at least one item")
    if len(items) > MAX_BATCH_ITEMS:
        raise invalid(
            "items", f"must hold at most {MAX_BATCH_ITEMS} items, got {len(items)}"
        )
    for item in items:
        check_item(item, field="items")
    return items


def decode_percent(raw: str, field: str) -> str:
    """Percent-decode ``raw`` strictly: every '%' starts an escape, and the bytes
    are UTF-8 (design.md: names and items are UTF-8).

    aiohttp decodes leniently: in a path '%FF' stays the text "%FF", the same
    name as '%25FF'; in a query it becomes U+FFFD.  Either way two requests
    that differ would name the same thing.
    """
    bad = _BAD_ESCAPE.search(raw)
    if bad:
        escape = raw[bad.start() : bad.start() + 3]
        raise invalid(
            field, f"must be percent-encoded UTF-8; {escape!r} is not an escape"
        )
    data = unquote_to_bytes(raw.encode("utf-8", "surrogateescape"))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = "".join(f"%{byte:02X}" for byte in data[exc.start : exc.end])
        raise invalid(
            field, f"must be percent-encoded UTF-8; {shown} does not decode as UTF-8"
        ) from None


_BAD_ESCAPE = re.compile("%(?![0-9A-Fa-f]{2})")


def check_whole_number(
    raw: str, field: str, low: int, high: int, *, unit: str = ""
) -> int:
    """A whole number given as text (a query parameter): ASCII digits only.

    ``int()`` alone would also take " 5", "+5", "1_0" and "\u0663" (an Arabic
    three), and a 5000-digit string would make it raise.
    """
    digits = raw.lstrip("0") or "0"
    if _DIGITS.fullmatch(raw) and len(digits) <= len(str(high)):
        number = int(digits)
        if low <= number <= high:
            return number
    what = f"a whole number of {unit}" if unit else "a whole number"
    raise invalid(field, f"must be {what} from {low} to {high}, got {raw!r}")


_DIGITS = re.compile(r"[0-9]+")


def check_indexer_id(value: Any, *, field: str = "id") -> str:
    """An indexer id: 1 to 128 of letters, digits, ``.``, ``_``, ``:``, ``-``."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise invalid(
            field,
            f"must be 1 to 128 of letters, digits, '.', '_', ':', '-'; got {value!r}",
        )
    # Tighter than design.md: URLs drop "." and ".." segments (RFC 3986 5.2.4).
    if value in (".", ".."):
        raise invalid(
            field, f"must not be {value!r}, which a URL path drops as a dot segment"
        )
    return value


def check_address(value: Any, *, field: str = "address") -> str:
    """``http(s)://host:port``, IPv6 in brackets; returns it normalised.

    Normalised means lower-case scheme and host, no trailing slash, so the same
    indexer given twice compares equal.
    """
    if not isinstance(value, str):
        raise invalid(field, f"must be a string like http://host:port, got {value!r}")
    expected = f"must be http://host:port or https://host:port, got {value!r}"
    # Checked before urlsplit, which silently drops tabs and newlines anywhere
    # and control characters and spaces in front.
    if any(char.isspace() or unicodedata.category(char) == "Cc" for char in value):
        raise invalid(field, f"{expected}: no spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise invalid(field, f"{expected} ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise invalid(field, expected)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise invalid(field, f"{expected}: no path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise invalid(field, f"{expected}: no user or password")
    if port is None:
        raise invalid(field, f"{expected}: the port is required")
    if not 1 <= port <= 65535:
        raise invalid(field, f"{expected}: port must be 1-65535")
    host = parts.hostname.lower()
    if not _is_host(host):
        raise invalid(
            field,
            f"{expected}: the host must be a DNS name, an IPv4 address or an IPv6 "
            "address in brackets",
        )
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host}:{port}"


# A DNS label: letters, digits and '-' (RFC 1123), and '_', which container and
# service-discovery names use; never a '-' at either end.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    """``host`` as urlsplit gives it (lower case, brackets removed)."""
    if ":" in host:  # only a bracketed host can hold one; urlsplit checked it
        return _is_ip(host, ipaddress.IPv6Address)
    labels = host.removesuffix(".").split(".")
    if labels[-1].isdigit():
        # No top-level domain is numeric (RFC 3696, section 2): an IPv4 address, or
        # nothing ("999.1.1.1", "80", "0x7f.1").
        return _is_ip(host, ipaddress.IPv4Address)
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _is_ip(
    host: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> bool:
    try:
        kind(host)
    except ValueError:
        return False
    return True


# -- messages between p2plb nodes: unknown fields ignored, "protocol" carried ------


class RegisterBody(msgspec.Struct):
    """``POST /v1/indexers``: an indexer joins (or rejoins) a balancer."""

    id: str
    address: str
    capacity: int
    zone: str | None = None
    instance: str | None = None
    protocol: int = PROTOCOL

    def check(self) -> RegisterBody:
        check_indexer_id(self.id)
        self.address = check_address(self.address)
        check_capacity(self.capacity)
        if self.zone is not None:
            if not 1 <= len(self.zone) <= 64:
                raise invalid("zone", "must be 1 to 64 characters")
            _check_no_control(self.zone, "zone")  # shown in tables and logs
        if self.instance is not None and not 1 <= len(self.instance) <= 128:
            raise invalid("instance", "must be 1 to 128 characters")
        return self


class LoadBody(msgspec.Struct):
    """``PUT /v1/indexers/{id}/load``: the periodic load report (heartbeat)."""

    load: int
    state: str = "serving"
    served: int | None = None
    capacity: int | None = None
    address: str | None = None
    instance: str | None = None
    peers_version: int | None = None  # the member list the indexer holds
    service_ms: float | None = None  # recent service time (p2plb.servicetime)
    protocol: int = PROTOCOL

    def check(self) -> LoadBody:
        if self.load < 0:
            raise invalid("load", f"must be an integer >= 0, got {self.load}")
        if self.state not in ("serving", "syncing"):
            raise invalid(
                "state", f'must be "serving" or "syncing", got {self.state!r}'
            )
        if self.served is not None and self.served < 0:
            raise invalid("served", f"must be an integer >= 0, got {self.served}")
        # JSON integers have no bound and msgspec keeps them whole; a count
        # past 64 bits would overflow the float arithmetic of the strategies.
        for name, count in (("load", self.load), ("served", self.served)):
            if count is not None and count > MAX_COUNT:
                raise invalid(name, f"must be at most {MAX_COUNT}")
        if self.capacity is not None:
            check_capacity(self.capacity)
        if self.address is not None:
            self.address = check_address(self.address)
        if self.service_ms is not None and not (
            0.0 <= self.service_ms <= MAX_SERVICE_MS  # also refuses NaN
        ):
            raise invalid(
                "service_ms",
                f"must be milliseconds from 0 to {MAX_SERVICE_MS:.0f} (an hour), "
                f"got {self.service_ms:g}",
            )
        return self


MAX_CAPACITY = 1_000_000
MAX_COUNT = 2**63 - 1


def check_capacity(value: int) -> int:
    if not 1 <= value <= MAX_CAPACITY:
        raise invalid(
            "capacity", f"must be an integer from 1 to {MAX_CAPACITY}, got {value}"
        )
    return value


# -- public requests to the balancer: unknown fields rejected ----------------------


class StrategyBody(msgspec.Struct, forbid_unknown_fields=True):
    """``PUT /v1/strategy``."""

    strategy: str


# -- answers: described for the OpenAPI document (p2plb.openapi) -----------------
#
# The handlers build their answers as dicts; these Structs say what those hold,
# and the API tests compare real answers with the schemas made from them.  The
# dashboard reads the status payload through ``Status``, typed.

Count = Annotated[int, msgspec.Meta(ge=0)]
Version = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{16}$")]


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """Every error answer: a snake_case code and a sentence naming the field."""

    error: ErrorDetail


class AddAnswer(msgspec.Struct):
    added: Count
    version: Version


class RemoveAnswer(msgspec.Struct):
    removed: Count
    version: Version


class IndexPage(msgspec.Struct):
    """One page of an index, sorted; ``next`` is the cursor for ``after``."""

    name: str
    items: list[str]
    next: str | None


class IndexList(msgspec.Struct):
    indices: list[str]


class IndexerHealth(msgspec.Struct):
    status: str
    id: str
    state: str


class IndexerLoad(msgspec.Struct):
    protocol: int
    id: str
    load: Count
    capacity: Annotated[int, msgspec.Meta(ge=1)]
    serving: Count
    queued: Count
    state: str
    served: Count
    service_ms: Annotated[float, msgspec.Meta(ge=0)] | None


class BalancerHealth(msgspec.Struct):
    status: str


class IndexerEntry(msgspec.Struct):
    """An indexer as the balancer lists it; never its instance, which proves
    an indexer's own DELETE."""

    id: str
    address: str
    capacity: Annotated[int, msgspec.Meta(ge=1)]
    zone: str | None
    state: str
    healthy: bool
    health_reason: str
    load: Count


class Peer(msgspec.Struct):
    id: str
    address: str
    state: str
    healthy: bool


class Registered(IndexerEntry):
    """The indexer's entry, and the other indexers it replicates with."""

    peers: list[Peer]
    peers_version: Count


class LoadAnswer(msgspec.Struct):
    """``peers`` is null when the indexer already holds ``peers_version``."""

    peers: list[Peer] | None
    peers_version: Count


class IndexerList(msgspec.Struct):
    """``indexers`` is null when ``members_since`` is the current version."""

    indexers: list[IndexerEntry] | None
    members_version: Count


class RouteAnswer(msgspec.Struct):
    id: str
    address: str


class RoutingRow(msgspec.Struct):
    id: str
    address: str
    capacity: Annotated[int, msgspec.Meta(ge=1)]
    load: Count
    state: str
    healthy: bool
    zone: str | None
    service_ms: Annotated[float, msgspec.Meta(ge=0)] | None


class RoutingTable(msgspec.Struct):
    version: Count
    strategy: str
    indexers: list[RoutingRow]


class Latency(msgspec.Struct):
    p50: float | None
    p99: float | None


class StatusRow(msgspec.Struct):
    id: str
    address: str
    zone: str | None
    capacity: Annotated[int, msgspec.Meta(ge=1)]
    current_load: Count
    load_percentage: Annotated[float, msgspec.Meta(ge=0, le=100)]
    healthy: bool
    state: str
    health_reason: str
    last_report_age_s: float | None
    requests: Count
    routed: Count
    errors: Count
    latency_ms: Latency


class Status(msgspec.Struct):
    healthy_indexers: Count
    total_indexers: Count
    total_requests: Count
    routed_requests: Count
    uptime_seconds: float
    strategy: str
    indexers: list[StatusRow]


class StrategyAnswer(msgspec.Struct):
    strategy: str
