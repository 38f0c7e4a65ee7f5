"""Tokens: unit rules, then a balancer and indexers started with them."""

from __future__ import annotations

import hmac
import os
import signal
from typing import Any

import aiohttp
import pytest

import p2plb.tokens as tokens_module
from p2plb.errors import RequestError
from p2plb.tokens import authorized_as
from procs import Procs, eventually, request
from test_balancer import p2plb
from test_membership import free_port

ROLES = {"cluster": "c-secret", "admin": "a-secret"}
REQUIRED = "Authorization: a Bearer cluster or admin token is required"
EXPECTED = (
    'Authorization: expected a Bearer cluster or admin token, as "Bearer <token>"'
)
NOT_VALID = "Authorization: the token is not valid here"


@pytest.mark.parametrize(
    ("header", "outcome"),
    [
        ("Bearer c-secret", "cluster"),
        ("bearer a-secret", "admin"),
        ("  Bearer   c-secret ", "cluster"),
        (None, (401, "missing_token", REQUIRED)),
        ("Bearer nope", (403, "wrong_token", NOT_VALID)),
        ("Basic c-secret", (401, "missing_token", EXPECTED)),
        ("Basic", (401, "missing_token", EXPECTED)),
        ("c-secret", (401, "missing_token", EXPECTED)),
        ("Bearer", (401, "missing_token", EXPECTED)),
        ("Bearer  ", (401, "missing_token", EXPECTED)),
        ("", (401, "missing_token", EXPECTED)),
    ],
)
def test_roles(header: str | None, outcome: object) -> None:
    if isinstance(outcome, str):
        assert authorized_as(header, ROLES) == outcome
        return
    with pytest.raises(RequestError) as info:
        authorized_as(header, ROLES)
    assert (info.value.status, info.value.code, info.value.message) == outcome


def test_an_unset_token_leaves_its_role_open() -> None:
    assert authorized_as(None, {"cluster": None}) == "cluster"


def test_every_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Timing cannot be asserted reliably; what can be is that no comparison
    # bypasses the constant-time one, which a plain == would.
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", recording)
    assert authorized_as("Bearer a-secret", ROLES) == "admin"
    assert compared == [(b"a-secret", b"c-secret"), (b"a-secret", b"a-secret")]
    compared.clear()
    with pytest.raises(RequestError):
        authorized_as("Bearer nope", ROLES)
    assert compared == [(b"nope", b"c-secret"), (b"nope", b"a-secret")]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_token_is_checked_before_the_id(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    tokens = ("--cluster-token", "c-secret", "--admin-token", "a-secret")
    url = procs.balancer("balancer", *tokens).url
    missing = {
        "error": {
            "code": "missing_token",
            "message": "Authorization: a Bearer cluster or admin token is required",
        }
    }
    bad_id = {
        "error": {
            "code": "invalid_field",
            "message": "id: must be 1 to 128 of letters, digits, '.', '_', ':', '-'; "
            "got 'bad id'",
        }
    }
    load = {"load": 0}

    for method, path, kwargs in (
        ("DELETE", "/v1/indexers/bad%20id", {}),
        ("PUT", "/v1/indexers/bad%20id/load", {"json": load}),
    ):
        status, body, _ = await request(http, method, url + path, **kwargs)
        assert (status, body) == (401, missing), path
        status, body, _ = await request(
            http, method, url + path, headers=bearer("guess"), **kwargs
        )
        assert (status, body["error"]["code"]) == (403, "wrong_token"), path
        status, body, _ = await request(
            http, method, url + path, headers=bearer("c-secret"), **kwargs
        )
        assert (status, body) == (400, bad_id), path


async def test_a_cluster_token_alone_guards_the_cluster_not_the_operator(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # No admin token (allowed on loopback): the admin's actions are open, but
    # registering and reporting still need the cluster token.
    url = procs.balancer("balancer", "--cluster-token", "c-secret").url
    entry = {"id": "i1", "address": "http://127.0.0.1:9", "capacity": 1}

    status, body, _ = await request(http, "POST", f"{url}/v1/indexers", json=entry)
    assert (status, body) == (
        401,
        {
            "error": {
                "code": "missing_token",
                "message": "Authorization: a Bearer cluster token is required",
            }
        },
    )
    status, body, _ = await request(
        http, "POST", f"{url}/v1/indexers", json=entry, headers=bearer("guess")
    )
    assert (status, body["error"]["code"]) == (403, "wrong_token")
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/indexers/i1/load", json={"load": 0}
    )
    assert (status, body["error"]["code"]) == (401, "missing_token")
    status, _, _ = await request(
        http, "POST", f"{url}/v1/indexers", json=entry, headers=bearer("c-secret")
    )
    assert status == 201

    status, body, _ = await request(
        http, "PUT", f"{url}/v1/strategy", json={"strategy": "p2c"}
    )
    assert (status, body) == (200, {"strategy": "p2c"})
    status, _, _ = await request(http, "DELETE", f"{url}/v1/indexers/i1")
    assert status == 204


async def test_balancer_and_indexers_with_tokens(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    tokens = ("--cluster-token", "c-secret", "--admin-token", "a-secret")
    balancer = procs.balancer("balancer", *tokens)
    url = balancer.url
    entry = {"id": "x", "address": "http://127.0.0.1:9", "capacity": 1}

    status, body, _ = await request(http, "POST", f"{url}/v1/indexers", json=entry)
    assert (status, body["error"]["code"]) == (401, "missing_token")
    status, body, _ = await request(
        http, "POST", f"{url}/v1/indexers", json=entry, headers=bearer("guess")
    )
    assert (status, body["error"]["code"]) == (403, "wrong_token")
    listed = (await request(http, "GET", f"{url}/v1/indexers"))[1]
    assert listed["indexers"] == []

    strategy = {"strategy": "p2c"}
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/strategy", json=strategy, headers=bearer("c-secret")
    )
    assert (status, body["error"]["code"]) == (403, "wrong_token")
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/strategy", json=strategy, headers=bearer("a-secret")
    )
    assert (status, body) == (200, {"strategy": "p2c"})

    flags = (
        "--balancer",
        url,
        "--cluster-token",
        "c-secret",
        "--report-interval",
        "0.3s",
    )
    one = procs.indexer("i1", *flags)
    two = procs.indexer("i2", *flags)

    async def joined() -> bool:
        listed = (await request(http, "GET", f"{url}/v1/indexers"))[1]["indexers"]
        return len(listed) == 2

    await eventually(joined)
    # A write needs a second copy: the push to the peer carries the token.
    one.wait_for(r"replication\.peer_added id=i2")
    item = {"items": ["kept"]}
    status, body, _ = await request(
        http, "POST", f"{one.url}/v1/indices/t/items", json=item
    )
    assert (status, body["added"]) == (200, 1), body
    assert (await request(http, "GET", f"{two.url}/v1/indices/t"))[1]["items"] == [
        "kept"
    ]

    # The CLI takes the admin token from its flag or its environment variable.
    refused = p2plb("strategy", "round_robin", "--balancer", url)
    assert refused.returncode == 1, refused
    assert refused.stderr == (
        f"p2plb: error: balancer {url}: Authorization: a Bearer admin token is "
        "required\n"
    )
    env = {**os.environ, "P2PLB_ADMIN_TOKEN": "a-secret"}
    changed = p2plb("strategy", "round_robin", "--balancer", url, env=env)
    assert changed.returncode == 0, changed
    answer = await request(http, "GET", f"{url}/v1/strategy")
    assert answer[1] == {"strategy": "round_robin"}

    status, body, _ = await request(
        http, "DELETE", f"{url}/v1/indexers/i2", headers=bearer("c-secret")
    )
    assert (status, body["error"]["message"]) == (
        403,
        "Authorization: removing another indexer needs the admin token; the "
        "cluster token removes only the instance registered as 'i2'",
    )
    status, body, _ = await request(
        http, "POST", f"{one.url}/internal/v1/push", json={"origin": "z", "upto": 1}
    )
    assert (status, body["error"]["code"]) == (401, "missing_token")

    one.signal(signal.SIGTERM)  # it removes itself with the cluster token
    one.wait_for(r"reporter\.unregistered balancer=\S+ status=204")
    assert (
        await request(
            http, "DELETE", f"{url}/v1/indexers/i2", headers=bearer("a-secret")
        )
    )[0] == 204

    # No token, right or wrong, reaches a log.
    for proc in procs.all:
        text = proc.log_path.read_text(errors="replace")
        for secret in ("c-secret", "a-secret", "guess"):
            assert secret not in text, (proc.name, secret)


async def test_another_scheme_than_bearer_is_a_missing_token(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    tokens = ("--cluster-token", "c-secret", "--admin-token", "a-secret")
    balancer = procs.balancer("balancer", *tokens)
    indexer = procs.indexer("i1", "--cluster-token", "c-secret")
    basic = {"Authorization": "Basic Yzpj"}
    entry = {"id": "x", "address": "http://127.0.0.1:9", "capacity": 1}

    registered = await request(
        http, "POST", f"{balancer.url}/v1/indexers", json=entry, headers=basic
    )
    pushed = await request(
        http,
        "POST",
        f"{indexer.url}/internal/v1/push",
        json={"origin": "z", "upto": 1},
        headers=basic,
    )

    def expected(roles: str) -> dict[str, Any]:
        message = f'Authorization: expected a Bearer {roles} token, as "Bearer <token>"'
        return {"error": {"code": "missing_token", "message": message}}

    for (status, body, headers), roles in (
        (registered, "cluster or admin"),
        (pushed, "cluster"),
    ):
        assert (status, body) == (401, expected(roles))
        assert headers["WWW-Authenticate"] == "Bearer"


async def test_no_public_answer_tells_an_instance_that_removes_an_indexer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # With the cluster token an indexer may remove itself only, by the
    # instance it registered with.  GET /v1/indexers once listed every
    # instance, so any holder of the cluster token could remove any indexer.
    tokens = ("--cluster-token", "c-secret", "--admin-token", "a-secret")
    url = procs.balancer("balancer", *tokens, "--probe-interval", "1h").url
    cluster = bearer("c-secret")
    victim = {"id": "i2", "address": "http://127.0.0.1:9", "capacity": 4,
              "instance": "secret-of-i2"}  # fmt: skip
    for id, instance in (("i1", "secret-of-i1"), ("i2", "secret-of-i2")):
        body = victim | {"id": id, "instance": instance}
        status, answer, _ = await request(
            http, "POST", f"{url}/v1/indexers", json=body, headers=cluster
        )
        assert status == 201, answer
        assert "instance" not in answer
        status, _, _ = await request(
            http, "PUT", f"{url}/v1/indexers/{id}/load", json={"load": 0},
            headers=cluster,
        )  # fmt: skip
        assert status == 200

    # Every answer a caller without a token gets, and what a registration
    # that names no instance answers.
    seen = ""
    for path in ("/v1/indexers", "/v1/status", "/v1/routing-table", "/dashboard",
                 "/metrics", "/openapi.json"):  # fmt: skip
        async with http.get(url + path) as answer:
            assert answer.status == 200, path
            seen += await answer.text()
    anonymous = {key: victim[key] for key in ("id", "address", "capacity")}
    status, answer, _ = await request(
        http, "POST", f"{url}/v1/indexers", json=anonymous, headers=cluster
    )
    assert status == 200
    seen += repr(answer)
    assert "secret-of" not in seen

    # A DELETE with any string those answers hold is refused: only an admin
    # removes another indexer.
    listed = (await request(http, "GET", f"{url}/v1/indexers"))[1]["indexers"]
    guesses = {str(value) for row in listed for value in row.values()} | {""}
    for guess in sorted(guesses):
        sender = {"P2PLB-Instance": guess, "P2PLB-Address": victim["address"]}
        status, answer, _ = await request(
            http, "DELETE", f"{url}/v1/indexers/i2", headers=cluster | sender
        )
        assert (status, answer["error"]["code"]) == (403, "wrong_token"), guess
    assert len((await request(http, "GET", f"{url}/v1/indexers"))[1]["indexers"]) == 2

    # The instance itself, known only to its process, removes it.
    sender = {"P2PLB-Instance": "secret-of-i2"}
    status, _, _ = await request(
        http, "DELETE", f"{url}/v1/indexers/i2", headers=cluster | sender
    )
    assert status == 204


async def test_with_a_cluster_token_only_the_instance_held_removes_an_indexer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # A balancer restored from a state file older than the indexer's restart
    # in place holds another instance than the process that stops.  The
    # address is public, so its DELETE proves nothing with a cluster token:
    # it is refused, the indexer says so, and probes take the entry out.
    port, indexer_port = free_port(), free_port()
    tokens = ("--port", str(port), "--cluster-token", "c-secret", "--admin-token",
              "a-secret")  # fmt: skip
    balancer = procs.balancer("balancer", *tokens)
    url = balancer.url
    state = procs.workdir / "balancer-state.json"
    earlier = {"id": "x1", "address": f"http://127.0.0.1:{indexer_port}",
               "capacity": 4, "instance": "a"}  # fmt: skip
    status, _, _ = await request(
        http, "POST", f"{url}/v1/indexers", json=earlier, headers=bearer("c-secret")
    )
    assert status == 201

    async def saved() -> bool:
        return b'"instance":"a"' in state.read_bytes()

    await eventually(saved, within=5)
    older = state.read_bytes()
    flags = ("--port", str(indexer_port), "--balancer", url, "--cluster-token",
             "c-secret", "--report-interval", "1h")  # fmt: skip
    indexer = procs.indexer("x1", *flags)
    indexer.wait_for(r"reporter\.registered ")
    balancer.kill()
    state.write_bytes(older)
    procs.balancer("balancer", *tokens).wait_for(r"state\.restored .*indexers=1 ")

    assert indexer.stop() == 0
    indexer.wait_for(
        r"WARNING p2plb\.reporter reporter\.unregister_refused balancer=\S+ "
        r"status=403 code=wrong_token error=\S+: Authorization: removing another "
        r"indexer needs the admin token"
    )
    listed = (await request(http, "GET", f"{url}/v1/indexers"))[1]["indexers"]
    assert [row["id"] for row in listed] == ["x1"]
