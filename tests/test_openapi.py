"""The OpenAPI documents: valid OpenAPI 3.1, complete, served, and true.

"True" means real answers of real processes match the schemas the document
gives for their path, method and status; ``answer_schema`` and ``check_answer``
are shared with the fuzz test, which holds every answer it gets to the same.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate

from p2plb.balancer import Balancer
from p2plb.config import BalancerConfig, IndexerConfig, build_config
from p2plb.indexer import Indexer
from p2plb.openapi import document
from p2plb.replication import ReplicationSettings, Replicator
from p2plb.storage import Storage
from procs import Procs, request

ROLES = ("balancer", "indexer")
# p2plb's own additions to design.md's codes: 408 request_timeout (a body
# slower than --body-timeout) and 508 loop_detected (a balancer's address
# registered as an indexer).
OWN_CODES = {"request_timeout", "loop_detected"}


def design_codes() -> set[str]:
    """Every error code in the table of design.md's "HTTP API"."""
    return {
        "invalid_json",
        "invalid_field",
        "unknown_field",
        "invalid_strategy",
        "missing_token",
        "wrong_token",
        "index_not_found",
        "indexer_not_found",
        "not_found",
        "superseded",
        "body_too_large",
        "no_healthy_indexer",
        "overloaded",
        "replica_behind",
        "insufficient_replicas",
    }


def template_of(doc: dict[str, Any], path: str) -> str | None:
    """The document's path template that ``path`` (decoded) matches, if any."""
    for template in doc["paths"]:
        regex = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(regex, path):
            return template
    return None


def answer_schema(
    doc: dict[str, Any], template: str, method: str, status: int
) -> dict[str, Any] | None:
    """The JSON schema of that answer, or None when the document gives no body.

    Raises ``KeyError`` when the document does not list the status at all.
    """
    operation = doc["paths"][template][method.lower()]
    response = operation["responses"][str(status)]
    content = response.get("content", {}).get("application/json")
    if content is None:
        return None
    schema: dict[str, Any] = dict(content["schema"])
    schema["components"] = doc["components"]
    return schema


def check_answer(
    doc: dict[str, Any], template: str, method: str, status: int, body: Any
) -> None:
    """Fail unless ``body`` is what the document says for that status."""
    try:
        schema = answer_schema(doc, template, method, status)
    except KeyError:
        pytest.fail(f"{method} {template}: status {status} not in the document")
    if schema is not None:
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("role", ROLES)
def test_document_is_valid_openapi_3_1(role: str) -> None:
    doc = document(role)

    validate(doc)

    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("role", ROLES)
def test_every_answer_with_a_body_has_a_schema(role: str) -> None:
    missing = []
    for path, operations in document(role)["paths"].items():
        for method, operation in operations.items():
            if operation["tags"] == ["internal"]:
                continue  # between indexers: shapes private to p2plb
            for status in ("200", "201"):
                answer = operation["responses"].get(status)
                if answer is None:
                    continue
                media = answer.get("content", {})
                if not media or any("schema" not in m for m in media.values()):
                    missing.append((method, path, status))

    assert missing == []


def routes(app: Any) -> set[tuple[str, str]]:
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.method != "HEAD"
    }


def test_every_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    balancer_config = build_config("balancer", {"state_file": str(tmp_path / "s")})
    indexer_config = build_config("indexer", {"id": "i1", "data_dir": str(tmp_path)})
    assert isinstance(balancer_config, BalancerConfig)
    assert isinstance(indexer_config, IndexerConfig)
    storage = Storage(tmp_path / "index.sqlite3", "i1")
    replicator = Replicator("i1", storage, settings=ReplicationSettings())
    apps = {
        "balancer": Balancer(balancer_config).make_app(),
        "indexer": Indexer(indexer_config, storage, replicator).make_app(),
    }

    for role, app in apps.items():
        documented = {
            (path, method)
            for path, operations in document(role)["paths"].items()
            for method in operations
        }
        assert documented == routes(app), role


def test_error_codes_and_parameters_of_design_md() -> None:
    balancer = document("balancer")
    public: set[str] = set()
    for operations in balancer["paths"].values():
        for operation in operations.values():
            for answer in operation["responses"].values():
                schema = answer.get("content", {}).get("application/json", {})
                for part in schema.get("schema", {}).get("allOf", [])[1:]:
                    public |= set(
                        part["properties"]["error"]["properties"]["code"]["enum"]
                    )
    # not_found belongs to no operation: it is the answer to an unknown path.
    assert public | {"not_found"} == design_codes() | OWN_CODES

    params = {
        (p["name"], p["in"]): p["schema"]
        for operations in balancer["paths"].values()
        for operation in operations.values()
        for p in operation.get("parameters", [])
    }
    assert params[("limit", "query")]["minimum"] == 1
    assert params[("limit", "query")]["maximum"] == 10_000
    assert params[("op", "query")]["enum"] == ["read", "write"]
    assert ("members_since", "query") in params
    assert ("after", "query") in params and ("item", "query") in params
    assert ("index", "query") in params
    assert {"name", "id"} <= {name for name, where in params if where == "path"}
    get_index = balancer["paths"]["/v1/indices/{name}"]["get"]["responses"]
    assert set(get_index) == {"200", "400", "404", "503", "508"}
    assert ("P2PLB-Via", "header") in params
    indexer = document("indexer")["paths"]["/v1/indices/{name}"]["get"]
    assert set(indexer["responses"]) == {"200", "400", "404", "503"}


async def test_served_documents_and_real_answers_match(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer()
    indexer = procs.indexer("i1", "--balancer", balancer.url)
    await request(http, "GET", f"{balancer.url}/v1/status")
    docs = {"balancer": document("balancer"), "indexer": document("indexer")}
    urls = {"balancer": balancer.url, "indexer": indexer.url}
    seen: dict[str, list[tuple[str, str, int]]] = {"balancer": [], "indexer": []}

    async def call(
        role: str, method: str, path: str, template: str, **kwargs: Any
    ) -> tuple[int, Any]:
        status, body, _ = await request(http, method, urls[role] + path, **kwargs)
        check_answer(docs[role], template, method, status, body)
        seen[role].append((method, template, status))
        return status, body

    for role in ROLES:
        assert (await call(role, "GET", "/openapi.json", "/openapi.json"))[1] == (
            docs[role]
        )
        await call(role, "GET", "/healthz", "/healthz")
        items = "/v1/indices/{name}/items"
        await call(role, "POST", "/v1/indices/s/items", items, json={"items": ["a"]})
        await call(role, "POST", "/v1/indices/s/items", items, json={"item": 1})
        await call(role, "POST", "/v1/indices/s/items", items, data=b"{")
        await call(role, "GET", "/v1/indices/s?limit=1", "/v1/indices/{name}")
        await call(role, "GET", "/v1/indices/t", "/v1/indices/{name}")
        await call(role, "GET", "/v1/indices/s?limit=0", "/v1/indices/{name}")
        await call(role, "GET", "/v1/indices", "/v1/indices")
        await call(role, "DELETE", "/v1/indices/s/items?item=b", items)
        remove = "/v1/indices/{name}/items/remove"
        await call(role, "POST", "/v1/indices/s/items/remove", remove, json={})

    await call("indexer", "GET", "/v1/load", "/v1/load")
    for path in ("/v1/indexers", "/v1/routing-table", "/v1/status", "/v1/strategy"):
        await call("balancer", "GET", path, path)
    await call("balancer", "GET", "/v1/route?op=write", "/v1/route")
    await call("balancer", "GET", "/v1/route?op=x", "/v1/route")
    await call(
        "balancer", "PUT", "/v1/strategy", "/v1/strategy", json={"strategy": "x"}
    )
    await call(
        "balancer", "PUT", "/v1/strategy", "/v1/strategy", json={"strategy": "p2c"}
    )
    entry = "/v1/indexers/{id}"
    await call(
        "balancer", "PUT", "/v1/indexers/i9/load", entry + "/load", json={"load": 1}
    )
    await call("balancer", "DELETE", "/v1/indexers/i9", entry)
    register = {"id": "i9", "address": "http://127.0.0.1:9", "capacity": 2}
    await call("balancer", "POST", "/v1/indexers", "/v1/indexers", json=register)
    await call("balancer", "DELETE", "/v1/indexers/i9", entry)

    assert (
        "POST",
        "/v1/indexers",
        201,
    ) in seen["balancer"] and ("DELETE", entry, 204) in seen["balancer"]
    assert {status for _, _, status in seen["indexer"]} == {200, 400, 404}
