"""The blocking client: ``AsyncClient`` run on an event loop of its own.

Rules of this module:

* Nothing is decided here.  Each method hands the ``AsyncClient`` coroutine of
  the same name to the client's loop and waits for its result, so both clients
  behave alike by construction; ``close()`` stands for ``aclose()``.
* The loop runs in a daemon thread owned by the client, because the routing
  table refreshes in the background between calls, which a loop that only
  runs during calls could not do.  ``close()`` stops and joins the thread.
* The client may be used from several threads: every call runs on the one
  loop, so the routing table is only ever touched by that loop's thread.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from p2plb.aliases import Aliases
from p2plb.client import AsyncClient
from p2plb.errors import UsageError

__all__ = ["Client"]

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Client(Aliases):
    """The p2plb index API for blocking code; see design.md "Python client".

    The arguments are those of ``AsyncClient``.
    """

    def __init__(
        self,
        balancers: str | Sequence[str] | None = None,
        indexers: Sequence[str] = (),
        *,
        mode: str = "routed",
        refresh_interval: float = 1.0,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        retries: int = 3,
        page_size: int = 1000,
        token: str | None = None,
        rng: int | random.Random | None = None,
        ca_file: str | None = None,
    ) -> None:
        self._client = AsyncClient(
            balancers,
            indexers,
            mode=mode,
            refresh_interval=refresh_interval,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            page_size=page_size,
            token=token,
            rng=rng,
            ca_file=ca_file,
        )
        self._closed = False
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="p2plb-client", daemon=True
        )
        self._thread.start()

    @property
    def mode(self) -> str:
        return self._client.mode

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        if self._closed:
            return
        self._run(self._client.aclose())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def add_to_index(self, index: str, item_or_items: str | Sequence[str]) -> int:
        """Add one item or a batch; returns how many were new."""
        return self._run(self._client.add_to_index(index, item_or_items))

    def remove_from_index(self, index: str, item_or_items: str | Sequence[str]) -> int:
        """Remove one item or a batch; returns how many were there."""
        return self._run(self._client.remove_from_index(index, item_or_items))

    def get_index(self, index: str) -> list[str] | None:
        """Every item of ``index``, sorted, following pages to the end; or None."""
        return self._run(self._client.get_index(index))

    def list_indices(self) -> list[str]:
        """The sorted names of the indices that have items."""
        return self._run(self._client.list_indices())

    def set_load_balancer(self, url: str | Sequence[str]) -> None:
        """Replace the balancers (one URL or several) and fetch a table from them."""
        self._run(self._client.set_load_balancer(url))

    def stats(self) -> dict[str, Any]:
        """Where requests went, what failed, and whether the client fell back."""
        return self._run(self._client.stats())

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            call.close()
            raise UsageError("this client is closed; create a new one")
        return asyncio.run_coroutine_threadsafe(call, self._loop).result()
