"""Fuzzing the public HTTP API of a real indexer and a real balancer.

Requests are drawn by hypothesis from the OpenAPI documents (``p2plb.openapi``):
every public path and method, with path segments, query strings, headers and
bodies that conform to the documented schemas, that have the right shape but
random values, or that are malformed (wrong types, unknown fields, broken
JSON, lone surrogates, huge strings, odd path segments and query strings,
wrong methods).  Every answer must hold to these rules:

* no 5xx, except a 503 or a 508 whose code the document lists for that
  operation (a 508 answers a request that says a balancer forwarded it);
* both processes still running;
* a 4xx carries ``{"error": {"code", "message"}}`` with a code of design.md
  or of p2plb's own (``OWN_CODES``), or ``method_not_allowed`` for a 405,
  ``uri_too_long`` for a 414; and when the request reached an operation the
  whole answer matches what the document says for its status;
* a 4xx changes nothing: the indices and their contents, the registered
  indexers and the strategy are compared with a snapshot taken before.

An accepted request may change the state; the harness then puts the cluster
back (the seed contents, the one real indexer, serving) and takes a new
snapshot.  ``P2PLB_FUZZ_EXAMPLES`` sets the examples per server (default 200).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2plb.openapi import document
from procs import Proc, Procs
from test_openapi import OWN_CODES, check_answer, design_codes

EXAMPLES = int(os.environ.get("P2PLB_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
SEED = {"songs": ["a", "b", "peer-17"], "wörter": ["ä", "日本"]}
NAMES = ["songs", "wörter", "empty", "s p a c e"]
IDS = ["i1", "ghost", "fake-1"]
# Beyond design.md's table: answers of the router and of the URL length limit.
ROUTER_CODES = {"not_found", "method_not_allowed", "uri_too_long"}
CODES = design_codes() | OWN_CODES | ROUTER_CODES
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]

# Path segments and query strings a careless or hostile client might send.
ODD_SEGMENTS = [
    "", "%", "%zz", "%C3", "%ED%A0%80", "%FF", "%00", "%0A", "%2F", "a%2Fb", ".",
    "..", "%2E", "%2E%2E", ";", "a;b=c", "%25", "+", "~", "%F0%9F%98%80",
    "%EF%BF%BF", "%E2%80%AE", "x" * 300, "%41" * 257, "%C0%AF", "%09",
]  # fmt: skip
ODD_QUERIES = [
    "", "?", "?&&", "?=x", "?a", "?limit=", "?limit=%FF", "?limit=1e3",
    "?limit=+5", "?limit=-1", "?limit=0", "?limit=10001", "?limit=0x10",
    "?limit=%D9%A3", "?limit=1&limit=2", "?after=", "?after=%00", "?item=",
    "?item=%00", "?item=%ED%A0%80", "?op=READ", "?op=", "?index=%2F", "?index=",
    "?members_since=-1", "?members_since=%FF", "?%ZZ=1", "?foo=bar",
    "?limit=5&foo", "?" + "k=v&" * 2000, "?item=" + "x" * 5000,
]  # fmt: skip
# Bodies that every operation with a body must refuse.
BROKEN_BODIES = [
    b"", b" ", b"{", b"}", b"[", b"{]", b'{"item"}', b'{"item": }', b"nul",
    b'{"item": "a",}', b'{"item": "\\ud800"}', b'{"item": "\\udfff\\ud800"}',
    b'{"items": ["\\ud83d"]}', b'{"item": "\xff"}', b'{"item": "\xed\xa0\x80"}',
    b'{"item": "\\u0000"}', b'{"load": NaN}', b'{"load": 1e400}',
    b'{"load": 99999999999999999999999}', b'{"load": 1' + b"0" * 400 + b"}",
    b"\x00\x01\x02", b"\xef\xbb\xbf{}",
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"strategy": "p2c"} trailing', b'"just a string"', b"123",
]  # fmt: skip
# Odd but well-formed: what they do depends on where they are sent.
ODD_BODIES = [b'{"item": "\\ud83d\\ude00"}', b'{"item": "a", "item": "b"}']
ODD_TEXT = st.sampled_from(
    ["", " ", "\x00", "\x7f", "\u202e", "\ufeff", "\uffff", "\U0010ffff",
     "\ud800", "\udfff", "e\u0301", "/", "..", "%2F", "a" * 5000, "é" * 3000]
)  # fmt: skip


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Connection:
    """A keep-alive HTTP/1.1 connection that sends exactly the bytes given."""

    url: str
    sent: int = 0
    _conn: http.client.HTTPConnection | None = field(default=None, repr=False)

    def send(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        self.sent += 1
        for attempt in range(2):
            if self._conn is None:
                parts = urlsplit(self.url)
                assert parts.hostname is not None
                self._conn = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=30
                )
            try:
                self._conn.request(method, target, body=body, headers=headers or {})
                response = self._conn.getresponse()
                payload = response.read()
            except (http.client.HTTPException, OSError):
                # The server may close a connection after refusing a body;
                # one retry on a fresh connection tells that from a crash.
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            if response.will_close:
                self._conn.close()
                self._conn = None
            return Answer(response.status, dict(response.getheaders()), payload)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def json(self, method: str, target: str, payload: Any = None) -> Answer:
        body = None if payload is None else json.dumps(payload).encode()
        return self.send(method, target, body, {"Content-Type": "application/json"})


@dataclass(repr=False)
class Cluster:
    balancer: Proc
    indexer: Proc
    control: dict[str, Connection]
    fuzz: dict[str, Connection]
    registration: dict[str, Any]
    baseline: Any = None
    settled: int = 0

    def alive(self) -> None:
        for proc in (self.balancer, self.indexer):
            assert proc.running, f"{proc.name} died:\n{proc.log()[-3000:]}"

    def snapshot(self) -> Any:
        indexer, balancer = self.control["indexer"], self.control["balancer"]
        names = indexer.send("GET", "/v1/indices").json()["indices"]
        contents = {}
        for name in names:
            page = indexer.send(
                "GET", f"/v1/indices/{quote(name, safe='')}?limit=10000"
            )
            contents[name] = page.json()["items"]
        indexers = balancer.send("GET", "/v1/indexers").json()["indexers"]
        keys = ("id", "address", "capacity", "zone", "state", "healthy")
        rows = sorted(tuple(row[k] for k in keys) for row in indexers)
        strategy = balancer.send("GET", "/v1/strategy").json()
        return {"contents": contents, "indexers": rows, "strategy": strategy}

    def settle(self) -> None:
        """Undo what an accepted request changed, then take a new baseline."""
        indexer, balancer = self.control["indexer"], self.control["balancer"]
        now = self.snapshot()
        for name, items in now["contents"].items():
            extra = [item for item in items if item not in SEED.get(name, [])]
            if extra:
                path = f"/v1/indices/{quote(name, safe='')}/items/remove"
                assert indexer.json("POST", path, {"items": extra}).status == 200
        for name, items in SEED.items():
            if now["contents"].get(name) != items:
                path = f"/v1/indices/{quote(name, safe='')}/items"
                assert indexer.json("POST", path, {"items": items}).status == 200

        own = self.registration
        mine = (own["id"], own["address"], own["capacity"], own["zone"])
        kept = False
        for row in now["indexers"]:
            if row[:4] == mine:
                kept = row[4] == "serving"
                continue
            if row[0] != own["id"]:
                assert balancer.send("DELETE", f"/v1/indexers/{row[0]}").status == 204
        if not kept:
            answer = balancer.json("POST", "/v1/indexers", own)
            assert answer.status in (200, 201), answer
            report = {"load": 0, "state": "serving"}
            answer = balancer.json("PUT", f"/v1/indexers/{own['id']}/load", report)
            assert answer.status == 200, answer

        self.settled += 1
        self.baseline = self.snapshot()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One balancer and one indexer registered with it, quiet in the background.

    Reports and member polls every hour, so nothing but the fuzzed requests
    changes the state between two snapshots.
    """
    procs = Procs(Path(tmp_path_factory.mktemp("fuzz")))
    connections: list[Connection] = []
    try:
        balancer = procs.balancer(
            "balancer", "--unhealthy-after", "1h", "--forget-after", "2h"
        )
        indexer = procs.indexer(
            "i1",
            "--balancer",
            balancer.url,
            "--report-interval",
            "1h",
            "--membership-interval",
            "1h",
        )
        control = {
            "balancer": Connection(balancer.url),
            "indexer": Connection(indexer.url),
        }
        fuzz = {
            "balancer": Connection(balancer.url),
            "indexer": Connection(indexer.url),
        }
        connections = [*control.values(), *fuzz.values()]
        deadline = time.monotonic() + 20
        while True:
            rows = control["balancer"].send("GET", "/v1/indexers").json()["indexers"]
            if rows and rows[0]["state"] == "serving" and rows[0]["healthy"]:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        keys = ("id", "address", "capacity", "zone")
        registration = {key: rows[0][key] for key in keys}
        cluster = Cluster(balancer, indexer, control, fuzz, registration)
        cluster.settle()
        yield cluster
    finally:
        for connection in connections:
            connection.close()
        procs.close()


# -- drawing requests from the document -----------------------------------------


def resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def conforming(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that satisfy ``schema`` (as far as JSON Schema can say)."""
    schema = resolve(schema, doc)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of(*(conforming(s, doc) for s in schema["anyOf"]))
    kind = schema.get("type")
    if kind == "string":
        low, high = schema.get("minLength", 0), min(schema.get("maxLength", 40), 40)
        if "pattern" in schema:
            text = st.from_regex(schema["pattern"], fullmatch=True)
            return text.filter(lambda s: low <= len(s) <= schema.get("maxLength", 1e9))
        return st.text(min_size=low, max_size=max(low, high))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum", 2**31))
    if kind == "array":
        return st.lists(conforming(schema["items"], doc), min_size=1, max_size=4)
    if kind == "object":
        props = schema["properties"]
        required = set(schema.get("required", []))
        if "oneOf" in schema:
            choices = [set(option["required"]) for option in schema["oneOf"]]
            return st.sampled_from(choices).flatmap(
                lambda need: st.fixed_dictionaries(
                    {k: conforming(props[k], doc) for k in need}
                )
            )
        return st.fixed_dictionaries(
            {k: conforming(props[k], doc) for k in required},
            optional={
                k: conforming(v, doc) for k, v in props.items() if k not in required
            },
        )
    return st.none()


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20) | ODD_TEXT,
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=6,
    )


def shaped(schema: dict[str, Any], doc: dict[str, Any]) -> st.SearchStrategy[Any]:
    """The schema's shape with random values of the right JSON type."""
    schema = resolve(schema, doc)
    if "anyOf" in schema:
        return st.one_of(*(shaped(s, doc) for s in schema["anyOf"]))
    kind = schema.get("type", "string")
    if kind == "string":
        return st.text(max_size=60) | ODD_TEXT | st.sampled_from(NAMES + IDS)
    if kind == "integer":
        return st.integers(-(2**64), 2**64 + 5) | st.sampled_from(
            [-1, 0, 1, 10**6 + 1, 2**63, 10**400]
        )
    if kind == "array":
        return st.lists(shaped(schema["items"], doc), max_size=6)
    if kind == "object":
        props = schema["properties"]
        return st.fixed_dictionaries(
            {}, optional={k: shaped(v, doc) for k, v in props.items()}
        )
    return json_values()


def segment(text: str) -> str:
    """A path segment: ``text`` percent-encoded as UTF-8, lone surrogates too."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@dataclass
class Request:
    kind: str
    method: str
    template: str
    target: str
    body: bytes | None
    headers: dict[str, str]

    def __str__(self) -> str:
        body = self.body if self.body is None or len(self.body) < 300 else "<big>"
        return f"{self.kind}: {self.method} {self.target[:300]} {body!r}"


KINDS = [
    "valid", "valid", "shaped", "shaped", "wrong_type", "unknown_field",
    "broken_json", "huge", "odd_path", "odd_query", "wrong_method",
]  # fmt: skip


def public_operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (template, method, operation)
        for template, operations in sorted(doc["paths"].items())
        for method, operation in sorted(operations.items())
        if "internal" not in operation["tags"]
    ]


def draw_request(data: st.DataObject, doc: dict[str, Any]) -> Request:
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    template, method, operation = data.draw(
        st.sampled_from(public_operations(doc)), label="operation"
    )
    params = operation.get("parameters", [])
    if kind == "wrong_method":
        others = [m for m in METHODS if m.lower() not in doc["paths"][template]]
        if "get" in doc["paths"][template]:
            others = [m for m in others if m != "HEAD"]
        method = data.draw(st.sampled_from(others or ["PATCH"]))
    else:
        method = method.upper()

    # Path: documented values, pooled ones, random text or odd segments.
    target = template
    for param in (p for p in params if p["in"] == "path"):
        pool = NAMES if param["name"] == "name" else IDS
        choices = [
            conforming(param["schema"], doc).map(segment),
            st.sampled_from(pool).map(segment),
        ]
        if kind in ("shaped", "odd_path"):
            choices.append((st.text(max_size=20) | ODD_TEXT).map(segment))
        if kind == "odd_path":
            choices = [st.sampled_from(ODD_SEGMENTS)]
        value = data.draw(st.one_of(*choices), label=param["name"])
        target = target.replace("{" + param["name"] + "}", value or "%20")

    # Query: each documented parameter maybe, then odd forms.
    if kind == "odd_query":
        target += data.draw(st.sampled_from(ODD_QUERIES), label="query")
    else:
        pairs = []
        for param in (p for p in params if p["in"] == "query"):
            if param["required"] or data.draw(st.booleans()):
                value = data.draw(
                    conforming(param["schema"], doc)
                    if kind == "valid"
                    else conforming(param["schema"], doc) | st.text(max_size=10),
                    label=param["name"],
                )
                pairs.append(f"{param['name']}={segment(str(value))}")
        if pairs:
            target += "?" + "&".join(pairs)

    headers = {"Content-Type": "application/json"}
    if data.draw(st.integers(0, 9)) == 0:
        headers["P2PLB-Min-Version"] = data.draw(
            st.sampled_from(["", "zz", "0" * 16, "f" * 16, "1" * 40, "-1"])
        )
    if data.draw(st.integers(0, 9)) == 0:
        headers["P2PLB-Via"] = data.draw(st.sampled_from(["", "b1", "x" * 300]))
    body = None
    if "requestBody" in operation or kind == "broken_json":
        schema = (operation.get("requestBody") or {}).get("content", {})
        schema = schema.get("application/json", {}).get("schema", {})
        body = draw_body(data, kind, schema, doc)
    return Request(kind, method, template, target, body, headers)


def draw_body(
    data: st.DataObject, kind: str, schema: dict[str, Any], doc: dict[str, Any]
) -> bytes:
    if kind == "broken_json" or not schema:
        return data.draw(
            st.sampled_from(BROKEN_BODIES + ODD_BODIES) | st.binary(max_size=40)
        )
    if kind == "huge":
        return data.draw(
            st.sampled_from(
                [
                    json.dumps({"item": "x" * 4097}).encode(),
                    json.dumps({"item": "é" * 2049}).encode(),
                    json.dumps({"items": ["a"] * 10_001}).encode(),
                    json.dumps({"items": [str(n) for n in range(5000)]}).encode(),
                    json.dumps({"strategy": "x" * 600_000}).encode(),
                    json.dumps({"item": "y" * (1024 * 1024 + 1)}).encode(),
                    b" " * (1024 * 1024 + 10),
                ]
            )
        )
    value = data.draw(
        conforming(schema, doc) if kind == "valid" else shaped(schema, doc)
    )
    if kind == "wrong_type":
        if isinstance(value, dict) and value and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(value)))
            value[key] = data.draw(
                json_values().filter(lambda v: type(v) is not type(value[key]))
            )
        else:
            value = data.draw(json_values().filter(lambda v: not isinstance(v, dict)))
    if kind == "unknown_field":
        value = dict(value) if isinstance(value, dict) else {}
        value[data.draw(st.text(min_size=1, max_size=10) | st.just("protocol_x"))] = 1
    return json.dumps(value, ensure_ascii=data.draw(st.booleans())).encode(
        "utf-8", "surrogatepass"
    )


# -- the checks -------------------------------------------------------------------


def check(cluster: Cluster, role: str, request: Request, answer: Answer) -> None:
    doc = document(role)
    where = f"{role} {request} -> {answer.status} {answer.body[:300]!r}"
    cluster.alive()
    operation = doc["paths"][request.template].get(request.method.lower())
    if answer.status >= 500:
        assert answer.status in (503, 508) and operation is not None, where
    is_json = "json" in answer.headers.get("Content-Type", "")
    body = answer.json() if is_json else None

    if answer.status >= 400:
        assert is_json, where
        assert set(body) == {"error"}, where
        assert set(body["error"]) == {"code", "message"}, where
        assert body["error"]["code"] in CODES, where
        assert isinstance(body["error"]["message"], str), where
        if body["error"]["code"] in ROUTER_CODES:
            return  # answered before any operation was reached

    # Dot segments reach the operation drawn: no hop removes them (a name
    # '..' is an index, an id '..' a 400).
    if operation is None:
        return
    if is_json:
        check_answer(doc, request.template, request.method, answer.status, body)
    else:
        assert str(answer.status) in operation["responses"], where


def fuzz(cluster: Cluster, role: str, data: st.DataObject) -> None:
    request = draw_request(data, document(role))
    answer = cluster.fuzz[role].send(
        request.method, request.target, request.body, request.headers
    )
    check(cluster, role, request, answer)
    if 400 <= answer.status < 500:
        after = cluster.snapshot()
        assert after == cluster.baseline, f"{role} {request} changed the state"
    else:
        cluster.settle()


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_indexer(cluster: Cluster, data: st.DataObject) -> None:
    fuzz(cluster, "indexer", data)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_balancer(cluster: Cluster, data: st.DataObject) -> None:
    fuzz(cluster, "balancer", data)


@pytest.mark.parametrize("role", ["indexer", "balancer"])
def test_every_broken_body_on_every_operation_with_a_body(
    cluster: Cluster, role: str
) -> None:
    """Each broken body once everywhere, internal endpoints included.

    Hypothesis draws only some of these pairs in the default run; a body nested
    thousands deep once answered 500 on ``POST /v1/indexers``.
    """
    cluster.settle()
    doc = document(role)
    targets = [
        (template.replace("{name}", "songs").replace("{id}", "i1"), method)
        for template, operations in sorted(doc["paths"].items())
        for method in operations
        if method in ("post", "put")
    ]
    for target, method in targets:
        for body in BROKEN_BODIES:
            answer = cluster.fuzz[role].send(
                method.upper(), target, body, {"Content-Type": "application/json"}
            )
            where = f"{role} {method} {target} {body[:60]!r} -> {answer.body[:200]!r}"

            cluster.alive()
            assert 400 <= answer.status < 500, where
            assert answer.json()["error"]["code"] in CODES, where
            assert cluster.snapshot() == cluster.baseline, where


# -- below the HTTP client: bytes no client library would send ------------------

RAW = [
    b"GET /v1/indices/\xff\xfe HTTP/1.1\r\n\r\n",
    b"GET /v1/indices/a\x01b HTTP/1.1\r\n\r\n",
    b"GET /v1/indices/a b HTTP/1.1\r\n\r\n",
    b"GET //v1/indices HTTP/1.1\r\n\r\n",
    b"GET v1/indices HTTP/1.1\r\n\r\n",
    b"GET * HTTP/1.1\r\n\r\n",
    b"GET http://elsewhere/v1/indices HTTP/1.1\r\n\r\n",
    b"GET /v1/route?index=\xed\xa0\x80 HTTP/1.1\r\n\r\n",
    b"GET /v1/indices/s HTTP/1.1\r\nP2PLB-Min-Version: \xff\xfe\r\n\r\n",
    b"POST /v1/indices/s/items HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/indices/s/items HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    b"POST /v1/indices/s/items HTTP/1.1\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    b"POST /v1/indices/s/items HTTP/1.1\r\nContent-Encoding: deflate\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    b"PUT /v1/strategy HTTP/1.1\r\nAuthorization: Bearer \xff\r\n"
    b'Content-Length: 18\r\n\r\n{"strategy":"p2c"}',
    b"FOO /v1/indices HTTP/1.1\r\n\r\n",
    b"GET /v1/indices HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
]


def raw_call(url: str, request: bytes) -> tuple[int, bytes, bytes]:
    """Send ``request`` with ``Connection: close``; (status, headers, body)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    line, _, rest = request.partition(b"\r\n")
    request = line + b"\r\nHost: x\r\nConnection: close\r\n" + rest
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head, body


@pytest.mark.parametrize("role", ["indexer", "balancer"])
def test_raw_requests_get_4xx_and_change_nothing(cluster: Cluster, role: str) -> None:
    """What aiohttp's parser refuses gets its plain-text 400; the rest, JSON."""
    cluster.settle()
    url = cluster.indexer.url if role == "indexer" else cluster.balancer.url
    for request in RAW:
        status, head, body = raw_call(url, request)
        where = f"{role} {request[:80]!r} -> {head[:100]!r} {body[:200]!r}"

        cluster.alive()
        assert status < 500, where
        if b"application/json" in head and status >= 400:
            error = json.loads(body)["error"]
            assert error["code"] in CODES and error["message"], where
        elif status >= 400:
            assert status == 400 and head.startswith(b"HTTP/1.0 400"), where
        if status >= 400:
            assert cluster.snapshot() == cluster.baseline, where
        else:
            cluster.settle()

    # A body that cannot be decoded is the caller's mistake (it was a 500).
    status, _, body = raw_call(url, RAW[11])
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"


def test_requests_were_sent(cluster: Cluster) -> None:
    """Runs last: how many requests the tests above sent, for the record."""
    sent = {role: conn.sent for role, conn in cluster.fuzz.items()}
    checks = sum(conn.sent for conn in cluster.control.values())
    if not any(sent.values()):
        pytest.skip("no fuzz test ran in this session")
    print(
        f"fuzz: sent {sent} (+{2 * (len(RAW) + 1)} raw); "
        f"{checks} more to snapshot and restore, {cluster.settled} restores"
    )
