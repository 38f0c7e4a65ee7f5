"""The OpenAPI 3.1 document of each server, served at ``GET /openapi.json``.

Rules of this module:

* Request bodies come from the wire Structs through
  ``msgspec.json.schema_components``, so the document cannot drift from what
  the servers decode.  The checks that ``p2plb.wire`` makes in code (lengths,
  patterns, ranges) are added to those schemas here, from the same constants.
* Answers are described by the answer Structs at the end of ``p2plb.wire``.
  They exist for the document (and for the dashboard's typed reading of the
  status): the handlers build their answers as dicts, and the API tests
  compare real answers with these schemas.
* Each operation lists every status it can answer and, for each error status,
  the exact error codes of design.md it can carry, as an ``enum`` on
  ``error.code``.
* The replication endpoints between indexers are listed under the tag
  ``internal``: their bodies are private to p2plb and not described.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from p2plb.config import STRATEGY_NAMES
from p2plb.dashboard import DEFAULT_REFRESH, MAX_REFRESH
from p2plb.web import check_query
from p2plb.wire import (
    MAX_BATCH_ITEMS,
    MAX_CAPACITY,
    MAX_COUNT,
    MAX_ITEM_BYTES,
    MAX_NAME_CHARS,
    AddAnswer,
    BalancerHealth,
    ErrorBody,
    IndexerHealth,
    IndexerList,
    IndexerLoad,
    IndexList,
    IndexPage,
    ItemsBody,
    LoadAnswer,
    LoadBody,
    RegisterBody,
    Registered,
    RemoveAnswer,
    RouteAnswer,
    RoutingTable,
    Status,
    StrategyAnswer,
    StrategyBody,
)

__all__ = ["document", "openapi_handler"]

_REF = "#/components/schemas/{name}"
_STATES = ["serving", "syncing"]
_NO_CONTROL = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
_NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME_CHARS,
    "pattern": "^[^/\\u0000-\\u001F\\u007F-\\u009F]+$",
    "description": f"1 to {MAX_NAME_CHARS} characters, no control characters, no '/'.",
}
_ITEM: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_ITEM_BYTES,
    "pattern": "^[^\\u0000]+$",
    "description": f"1 to {MAX_ITEM_BYTES} bytes of UTF-8, without NUL.",
}
_ID: dict[str, Any] = {
    "type": "string",
    "pattern": "^[A-Za-z0-9._:-]{1,128}$",
    "not": {"enum": [".", ".."]},
    "description": "1 to 128 of letters, digits, '.', '_', ':', '-'; not . or ..",
}
_ADDRESS: dict[str, Any] = {
    "type": "string",
    "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
    "description": (
        "http://host:port or https://host:port; the host a DNS name, an IPv4 "
        "address or an IPv6 address in brackets."
    ),
}
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
_CAPACITY: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_CAPACITY}

_STRUCTS: tuple[type[msgspec.Struct], ...] = (
    ItemsBody,
    RegisterBody,
    LoadBody,
    StrategyBody,
    ErrorBody,
    AddAnswer,
    RemoveAnswer,
    IndexPage,
    IndexList,
    IndexerHealth,
    IndexerLoad,
    BalancerHealth,
    Registered,
    LoadAnswer,
    IndexerList,
    RouteAnswer,
    RoutingTable,
    Status,
    StrategyAnswer,
)

# What wire.py and the registry check in code, as JSON Schema keywords.
_CHECKS: dict[tuple[str, str], dict[str, Any]] = {
    ("ItemsBody", "item"): _ITEM,
    ("ItemsBody", "items"): {
        "type": "array",
        "items": _ITEM,
        "minItems": 1,
        "maxItems": MAX_BATCH_ITEMS,
    },
    ("RegisterBody", "id"): _ID,
    ("RegisterBody", "address"): _ADDRESS,
    ("RegisterBody", "capacity"): _CAPACITY,
    ("RegisterBody", "zone"): {
        "anyOf": [
            {
                "type": "string",
                "minLength": 1,
                "maxLength": 64,
                "pattern": _NO_CONTROL,
            },
            {"type": "null"},
        ]
    },
    ("RegisterBody", "instance"): {
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": 128},
            {"type": "null"},
        ]
    },
    ("LoadBody", "load"): _COUNT,
    ("LoadBody", "state"): {"enum": _STATES, "default": "serving"},
    ("LoadBody", "served"): {"anyOf": [_COUNT, {"type": "null"}]},
    ("LoadBody", "capacity"): {"anyOf": [_CAPACITY, {"type": "null"}]},
    ("LoadBody", "address"): {"anyOf": [_ADDRESS, {"type": "null"}]},
    ("StrategyBody", "strategy"): {"enum": list(STRATEGY_NAMES)},
    ("StrategyAnswer", "strategy"): {"enum": list(STRATEGY_NAMES)},
    ("RoutingTable", "strategy"): {"enum": list(STRATEGY_NAMES)},
    ("Status", "strategy"): {"enum": list(STRATEGY_NAMES)},
    ("IndexPage", "name"): _NAME,
    ("IndexerEntry", "state"): {"enum": _STATES},
    ("Registered", "state"): {"enum": _STATES},
    ("RoutingRow", "state"): {"enum": _STATES},
    ("StatusRow", "state"): {"enum": _STATES},
    ("Peer", "state"): {"enum": _STATES},
    ("IndexerLoad", "state"): {"enum": _STATES},
    ("IndexerHealth", "state"): {"enum": _STATES},
}


def _schemas() -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_STRUCTS, ref_template=_REF)
    for (struct, field), schema in _CHECKS.items():
        components[struct]["properties"][field] = schema
    # Exactly one of the two, which ItemsBody.values() checks in code.
    components["ItemsBody"]["oneOf"] = [{"required": ["item"]}, {"required": ["items"]}]
    return components


# -- operations ---------------------------------------------------------------------

_REASONS = {
    200: "OK",
    201: "Created: a new indexer",
    204: "No Content",
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized: no token",
    403: "Forbidden: a token without the right",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout: the body arrived too slowly",
    409: "Conflict",
    413: "Content Too Large",
    503: "Service Unavailable",
    508: "Loop Detected: a balancer forwarded the request to a balancer",
}
# Any request with a body may get these: too slow (--body-timeout), too large.
_BODY_LIMITS = {408: ("request_timeout",), 413: ("body_too_large",)}
_BODY_ERRORS = {
    400: ("invalid_json", "invalid_field", "unknown_field"),
    **_BODY_LIMITS,
}
_CLUSTER: list[dict[str, list[str]]] = [{"clusterToken": []}, {"adminToken": []}]
_ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]
_TOKEN_ERRORS = {401: ("missing_token",), 403: ("wrong_token",)}
# A route that takes no query parameters refuses any (web.check_query).
_NO_QUERY: dict[int, tuple[str, ...]] = {400: ("unknown_field",)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _error(status: int, codes: tuple[str, ...]) -> dict[str, Any]:
    schema = {
        "allOf": [
            _ref("ErrorBody"),
            {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}},
        ]
    }
    answer: dict[str, Any] = {
        "description": f"{_REASONS[status]}: {', '.join(codes)}",
        "content": _json(schema),
    }
    if status == 503:
        answer["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return answer


def _op(
    op_id: str,
    summary: str,
    tag: str,
    answers: dict[int, str | None],
    errors: dict[int, tuple[str, ...]] | None = None,
    *,
    body: str | None = None,
    params: tuple[dict[str, Any], ...] = (),
    security: list[dict[str, list[str]]] | None = None,
) -> dict[str, Any]:
    """One operation; ``answers`` maps a success status to its schema's name."""
    responses: dict[str, Any] = {}
    for status, schema in answers.items():
        responses[str(status)] = {"description": _REASONS[status]}
        if schema is not None:
            responses[str(status)]["content"] = _json(_ref(schema))
    for status, codes in sorted((errors or {}).items()):
        responses[str(status)] = _error(status, codes)

    operation: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "tags": [tag],
        "responses": responses,
    }
    if params:
        operation["parameters"] = list(params)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if security is not None:
        operation["security"] = security
    return operation


def _param(
    name: str, where: str, schema: dict[str, Any], text: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "description": text,
        "schema": schema,
    }


def _merge(*parts: Mapping[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
    merged: dict[int, tuple[str, ...]] = {}
    for part in parts:
        for status, codes in part.items():
            merged[status] = merged.get(status, ()) + codes
    return merged


_NAME_PARAM = _param("name", "path", _NAME, "The index.")
_ID_PARAM = _param("id", "path", _ID, "The indexer.")
_MIN_VERSION = _param(
    "P2PLB-Min-Version",
    "header",
    {"type": "string", "pattern": "^[0-9a-fA-F]{16}$"},
    "Serve only from a replica that has caught up to this version.",
)
_VIA = _param(
    "P2PLB-Via",
    "header",
    {"type": "string"},
    "Set by a balancer on the requests it forwards; a balancer answers any "
    "request that carries it with 508 loop_detected, since only indexers "
    "should receive forwarded requests.",
)
_INSTANCE = _param(
    "P2PLB-Instance",
    "header",
    {"type": "string", "minLength": 1, "maxLength": 128},
    "The instance an indexer removing itself registered with; a replaced one "
    "gets 409 superseded and removes nothing.",
)
_ADDRESS_HEADER = _param(
    "P2PLB-Address",
    "header",
    _ADDRESS,
    "Where an indexer removing itself listens: one restarted at its entry's "
    "address may remove it (but for a cluster token, which needs the very "
    "instance registered).",
)
_LIMIT = _param(
    "limit",
    "query",
    {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 1000},
    "Items per page.",
)
_AFTER = _param("after", "query", _ITEM, "The last item of the previous page.")


def _index_api(proxied: bool) -> dict[str, Any]:
    """The index API; through the balancer it may also find no indexer, or
    find that an indexer entry holds a balancer's address."""
    busy: tuple[str, ...] = ("overloaded",)
    loop: dict[int, tuple[str, ...]] = {}
    via: tuple[dict[str, Any], ...] = ()
    if proxied:
        busy = ("no_healthy_indexer", *busy)
        loop = {508: ("loop_detected",)}
        via = (_VIA,)
    read_busy = {503: (*busy, "replica_behind"), **loop}
    write_busy = {503: (*busy, "insufficient_replicas"), **loop}
    tag = "index"
    return {
        "/v1/indices": {
            "get": _op(
                "listIndices",
                "Sorted names of the indices that hold items.",
                tag,
                {200: "IndexList"},
                _merge({400: ("invalid_field", "unknown_field")}, read_busy),
                params=(_MIN_VERSION, *via),
            )
        },
        "/v1/indices/{name}": {
            "get": _op(
                "getIndex",
                "One page of an index, sorted.",
                tag,
                {200: "IndexPage"},
                _merge(
                    {400: ("invalid_field", "unknown_field")},
                    {404: ("index_not_found",)},
                    read_busy,
                ),
                params=(_NAME_PARAM, _LIMIT, _AFTER, _MIN_VERSION, *via),
            )
        },
        "/v1/indices/{name}/items": {
            "post": _op(
                "addItems",
                "Add one item or a batch (idempotent).",
                tag,
                {200: "AddAnswer"},
                _merge(_BODY_ERRORS, write_busy),
                body="ItemsBody",
                params=(_NAME_PARAM, *via),
            ),
            "delete": _op(
                "deleteItem",
                "Remove one short item given in the query (idempotent).",
                tag,
                {200: "RemoveAnswer"},
                _merge({400: ("invalid_field", "unknown_field")}, write_busy),
                params=(
                    _NAME_PARAM,
                    _param("item", "query", _ITEM, "The item.", required=True),
                    *via,
                ),
            ),
        },
        "/v1/indices/{name}/items/remove": {
            "post": _op(
                "removeItems",
                "Remove one item or a batch (idempotent).",
                tag,
                {200: "RemoveAnswer"},
                _merge(_BODY_ERRORS, write_busy),
                body="ItemsBody",
                params=(_NAME_PARAM, *via),
            )
        },
    }


def _indexer_paths() -> dict[str, Any]:
    internal: dict[str, Any] = {}
    bucket_params = (
        _param("index", "query", _NAME, "The index.", required=True),
        _param("bucket", "query", {"type": "integer", "minimum": 0}, "", required=True),
    )
    for path, method, params in (
        ("/internal/v1/push", "post", ()),
        ("/internal/v1/beat", "post", ()),
        ("/internal/v1/summary", "get", ()),
        ("/internal/v1/buckets", "get", bucket_params[:1]),
        ("/internal/v1/bucket", "get", bucket_params),
    ):
        name = path.rsplit("/", 1)[1]
        errors = _merge(_TOKEN_ERRORS, {400: ("invalid_json", "invalid_field")})
        internal[path] = {
            method: _op(
                f"internal_{name}",
                "Replication between indexers; shapes private to p2plb.",
                "internal",
                {200: None},
                errors,
                params=params,
                security=_CLUSTER[:1],
            )
        }
    return {
        "/healthz": {
            "get": _op(
                "health",
                "Alive, and the storage answers.",
                "health",
                {200: "IndexerHealth"},
                {**_NO_QUERY, 503: ("storage_unavailable",)},
            )
        },
        "/v1/load": {
            "get": _op(
                "getLoad",
                "What the indexer reports.",
                "health",
                {200: "IndexerLoad"},
                _NO_QUERY,
            )
        },
        **_index_api(proxied=False),
        **internal,
    }


def _balancer_paths() -> dict[str, Any]:
    tag = "balancer"
    report_errors = _merge(
        {400: ("invalid_json", "invalid_field")},
        _TOKEN_ERRORS,
        {404: ("indexer_not_found",), 409: ("superseded",)},
        _BODY_LIMITS,
    )
    members_since = _param(
        "members_since",
        "query",
        _COUNT,
        "A members_version held: the answer is null while it is current.",
    )
    route_params = (
        _param("index", "query", _NAME, "The index the request is for."),
        _param(
            "op", "query", {"enum": ["read", "write"], "default": "read"}, "The use."
        ),
    )
    return {
        **_dashboard_paths(),
        "/healthz": {
            "get": _op("health", "Alive.", "health", {200: "BalancerHealth"}, _NO_QUERY)
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text format.",
                "tags": ["health"],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/indexers": {
            "post": _op(
                "registerIndexer",
                "An indexer joins, or joins again.",
                tag,
                {200: "Registered", 201: "Registered"},
                _merge(
                    {400: ("invalid_json", "invalid_field")},
                    _TOKEN_ERRORS,
                    _BODY_LIMITS,
                ),
                body="RegisterBody",
                security=_CLUSTER,
            ),
            "get": _op(
                "listIndexers",
                "Every registered indexer.",
                tag,
                {200: "IndexerList"},
                {400: ("invalid_field", "unknown_field")},
                params=(members_since,),
            ),
        },
        "/v1/indexers/{id}": {
            "delete": _op(
                "unregisterIndexer",
                "Remove an indexer (itself with the cluster token).",
                tag,
                {204: None},
                _merge(
                    {400: ("invalid_field",)},
                    _TOKEN_ERRORS,
                    {404: ("indexer_not_found",), 409: ("superseded",)},
                ),
                params=(_ID_PARAM, _INSTANCE, _ADDRESS_HEADER),
                security=_CLUSTER,
            )
        },
        "/v1/indexers/{id}/load": {
            "put": _op(
                "reportLoad",
                "The periodic load report (heartbeat).",
                tag,
                {200: "LoadAnswer"},
                report_errors,
                body="LoadBody",
                params=(_ID_PARAM,),
                security=_CLUSTER,
            )
        },
        "/v1/route": {
            "get": _op(
                "route",
                "Which indexer to use for one request (lookaside).",
                tag,
                {200: "RouteAnswer"},
                {
                    400: ("invalid_field", "unknown_field"),
                    503: ("no_healthy_indexer",),
                },
                params=route_params,
            )
        },
        "/v1/routing-table": {
            "get": _op(
                "routingTable",
                "Every indexer, for clients that route themselves.",
                tag,
                {200: "RoutingTable"},
                _NO_QUERY,
            )
        },
        "/v1/status": {
            "get": _op(
                "status",
                "The balancer's view of the cluster.",
                tag,
                {200: "Status"},
                _NO_QUERY,
            )
        },
        "/v1/strategy": {
            "get": _op(
                "getStrategy",
                "The active strategy.",
                tag,
                {200: "StrategyAnswer"},
                _NO_QUERY,
            ),
            "put": _op(
                "setStrategy",
                "Switch strategy on this balancer.",
                tag,
                {200: "StrategyAnswer"},
                _merge(
                    {400: ("invalid_json", "invalid_field", "unknown_field")},
                    {400: ("invalid_strategy",)},
                    _TOKEN_ERRORS,
                    _BODY_LIMITS,
                ),
                body="StrategyBody",
                security=_ADMIN,
            ),
        },
        **_index_api(proxied=True),
    }


def _dashboard_paths() -> dict[str, Any]:
    """The page for people, and ``/``, which sends a browser there."""
    refresh = _param(
        "refresh",
        "query",
        {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_REFRESH,
            "default": DEFAULT_REFRESH,
        },
        "Seconds between reloads of the page.",
    )
    errors: dict[int, tuple[str, ...]] = {400: ("invalid_field", "unknown_field")}
    page = _op(
        "dashboard",
        "GET /v1/status as an HTML page that reloads itself.",
        "balancer",
        {200: None},
        errors,
        params=(refresh,),
    )
    page["responses"]["200"]["content"] = {"text/html": {"schema": {"type": "string"}}}
    home = _op(
        "home",
        "Redirects a browser to /dashboard.",
        "balancer",
        {302: None},
        errors,
        params=(refresh,),
    )
    home["responses"]["302"]["headers"] = {
        "Location": {"schema": {"type": "string", "pattern": "^/dashboard"}}
    }
    return {"/": {"get": home}, "/dashboard": {"get": page}}


@functools.cache
def document(role: str) -> dict[str, Any]:
    """The whole document for ``role``: ``"balancer"`` or ``"indexer"``."""
    if role not in ("balancer", "indexer"):
        raise ValueError(f"role: must be 'balancer' or 'indexer', got {role!r}")
    paths = _balancer_paths() if role == "balancer" else _indexer_paths()
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "tags": ["health"],
            "responses": {
                "200": {"description": "OK", "content": _json({})},
                "400": _error(400, _NO_QUERY[400]),
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"p2plb {role}",
            "version": "1",
            "description": (
                "Errors answer {'error': {'code', 'message'}}.  Any path may "
                "also answer 404 not_found when unknown, 405 method_not_allowed "
                "to a wrong method and 414 uri_too_long to an overlong URL."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "clusterToken": {"type": "http", "scheme": "bearer"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
        },
    }


@functools.cache
def _encoded(role: str) -> bytes:
    return msgspec.json.encode(document(role))


def openapi_handler(role: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The ``GET /openapi.json`` handler of a server playing ``role``."""

    async def openapi(request: web.Request) -> web.Response:
        check_query(request)
        return web.Response(body=_encoded(role), content_type="application/json")

    return openapi
