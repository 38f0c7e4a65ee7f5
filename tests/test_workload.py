from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from p2plb.config import build_config
from p2plb.errors import ConfigError
from p2plb.workload import ServiceModel, parse_antagonist
from procs import Procs, request


def test_parse_antagonist() -> None:
    assert parse_antagonist("5/5s") == (5.0, 5.0)
    assert parse_antagonist("2.5 / 500ms") == (2.5, 0.5)
    for bad in ("5", "x/5s", "0.5/5s", "5/0s"):
        with pytest.raises(ValueError):
            parse_antagonist(bad)
    with pytest.raises(ConfigError, match="--antagonist: expected FACTOR/PERIOD"):
        build_config("indexer", {"id": "i", "antagonist": "slow"})


def test_slow_every_other_period() -> None:
    now = [100.0]
    model = ServiceModel(0.02, 5.0, 5.0, rng=random.Random(1), clock=lambda: now[0])
    seen = []
    for t in (0.0, 4.9, 5.0, 9.9, 10.0, 15.5):
        now[0] = 100.0 + t
        seen.append(model.slowdown())
    assert seen == [1.0, 1.0, 5.0, 5.0, 1.0, 5.0]


def test_service_times_are_exponential_with_the_mean() -> None:
    model = ServiceModel(0.02, rng=random.Random(7))
    draws = [model.draw() for _ in range(20_000)]
    mean = sum(draws) / len(draws)
    assert 0.019 < mean < 0.021
    above = sum(1 for d in draws if d > 0.02) / len(draws)
    assert 0.35 < above < 0.39  # e^-1 of an exponential lies above its mean


async def test_the_model_holds_the_capacity_slot(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.indexer(
        "i1", "--service-time", "30s", "--capacity", "1", "--queue-limit", "0"
    ).url
    slow = asyncio.create_task(request(http, "GET", f"{url}/v1/indices"))
    await asyncio.sleep(0.3)  # the first request now holds the only slot

    status, body, _ = await request(http, "GET", f"{url}/v1/indices")
    assert (status, body["error"]["code"]) == (503, "overloaded")
    slow.cancel()
