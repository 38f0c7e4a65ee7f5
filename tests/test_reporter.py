"""The indexer's view of its peers when several balancers list them.

No network: ``MemberViews`` is pure, and the reporter's answer handling is
driven directly with what balancers answer.
"""

from __future__ import annotations

from typing import Any

from p2plb.reporter import MemberViews, Reporter


def member(id: str, address: str = "", healthy: bool = True) -> dict[str, Any]:
    return {"id": id, "address": address or f"http://{id}:1", "healthy": healthy}


def test_no_list_heard_is_no_view() -> None:
    views = MemberViews()
    assert views.merged() is None
    assert views.forget("http://b1") is False


def test_the_union_sorted_by_id_and_the_newer_list_wins() -> None:
    views = MemberViews()
    views.heard("b1", [member("i3"), member("i1", healthy=False)])
    views.heard("b2", [member("i1"), member("i2", "http://new:1")])
    assert views.merged() == [member("i1"), member("i2", "http://new:1"), member("i3")]

    # b1 answers again: its entry for i1 is now the newest.
    views.heard("b1", [member("i1", healthy=False), member("i2", "http://old:1")])
    assert views.merged() == [
        member("i1", healthy=False),
        member("i2", "http://old:1"),
    ]

    assert views.forget("b1") is True
    assert views.merged() == [member("i1"), member("i2", "http://new:1")]
    assert views.forget("b2") is True
    assert views.merged() is None


def reporter(published: list[list[dict[str, Any]]]) -> Reporter:
    return Reporter(
        indexer_id="i0",
        address="http://i0:1",
        capacity=1,
        instance="x",
        balancers=("b1", "b2"),
        interval=10.0,
        load_report=dict,
        on_peers=published.append,
    )


def test_the_reporter_hands_on_the_union_and_only_changes() -> None:
    published: list[list[dict[str, Any]]] = []
    node = reporter(published)

    node._peers({"peers": [member("i1"), member("i2")], "peers_version": 4}, "b1")
    node._peers({"peers": [member("i1")], "peers_version": 7}, "b2")
    # Unchanged lists ("peers": null at the version held) change nothing.
    node._peers({"peers": None, "peers_version": 7}, "b2")
    assert published == [[member("i1"), member("i2")]]

    # b1 stops answering: only b2's list counts, and b2's version is kept.
    node._lost("b1")
    assert published[-1] == [member("i1")]
    assert node._peers_version == {"b2": 7}

    # No balancer answers: the last union stands.
    node._lost("b2")
    assert published == [[member("i1"), member("i2")], [member("i1")]]
    assert node._peers_version == {}
