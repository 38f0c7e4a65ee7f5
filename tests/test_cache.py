from __future__ import annotations

from p2plb.cache import ReadCache


def test_hit_until_the_index_changes() -> None:
    cache = ReadCache()
    generation = cache.generation("songs")
    cache.put("/v1/indices/songs", generation, 200, b"page")

    assert cache.get("/v1/indices/songs", "songs") == (200, b"page")
    cache.changed({"other"})
    assert cache.get("/v1/indices/songs", "songs") == (200, b"page")
    cache.changed({"songs"})
    assert cache.get("/v1/indices/songs", "songs") is None
    assert (cache.hits, cache.misses) == (2, 1)


def test_a_page_read_while_a_write_lands_is_never_served() -> None:
    cache = ReadCache()
    generation = cache.generation("songs")  # taken before the storage read
    cache.changed({"songs"})  # the write commits while the read runs
    cache.put("/v1/indices/songs", generation, 200, b"stale page")

    assert cache.get("/v1/indices/songs", "songs") is None


def test_the_list_of_indices_moves_with_any_index() -> None:
    cache = ReadCache()
    cache.put("list", cache.generation(None), 200, b"[]")
    assert cache.get("list", None) == (200, b"[]")
    cache.changed({"a"})
    assert cache.get("list", None) is None


def test_bounded_by_bytes_oldest_first() -> None:
    cache = ReadCache(max_bytes=80)
    for n in range(10):
        cache.put(f"/{n}", 0, 200, b"x" * 10)
    cache.get("/2", "i")  # recently used: kept
    cache.put("/new", 0, 200, b"y" * 10)

    assert cache.size == 80
    assert cache.get("/0", "i") is None and cache.get("/3", "i") is None
    assert cache.get("/2", "i") is not None and cache.get("/new", "i") is not None


def test_a_huge_page_is_not_cached() -> None:
    cache = ReadCache(max_bytes=80)
    cache.put("/big", 0, 200, b"z" * 11)
    assert cache.get("/big", "i") is None and cache.size == 0


def test_replacing_an_entry_keeps_the_size_right() -> None:
    cache = ReadCache()
    cache.put("/a", 0, 200, b"12345")
    cache.put("/a", 0, 200, b"12")
    assert cache.size == 2
