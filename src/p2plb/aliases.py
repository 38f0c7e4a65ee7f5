"""Names users of other P2P indexers know, kept for familiarity.

Each alias only calls the method it names; nothing else lives here.
``set_load_balancer`` is a method of the clients themselves, so it needs no
alias.  ``AsyncAliases`` is mixed into ``AsyncClient`` (its aliases are
awaited), ``Aliases`` into ``Client``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["Aliases", "AsyncAliases"]


class _AsyncIndexCalls(Protocol):
    async def add_to_index(
        self, index: str, item_or_items: str | Sequence[str]
    ) -> int: ...

    async def remove_from_index(
        self, index: str, item_or_items: str | Sequence[str]
    ) -> int: ...

    async def get_index(self, index: str) -> list[str] | None: ...

    async def list_indices(self) -> list[str]: ...


class _IndexCalls(Protocol):
    def add_to_index(self, index: str, item_or_items: str | Sequence[str]) -> int: ...

    def remove_from_index(
        self, index: str, item_or_items: str | Sequence[str]
    ) -> int: ...

    def get_index(self, index: str) -> list[str] | None: ...

    def list_indices(self) -> list[str]: ...


class AsyncAliases:
    async def lb_add_to_index(
        self: _AsyncIndexCalls, index: str, item_or_items: str | Sequence[str]
    ) -> int:
        """Same as ``add_to_index``."""
        return await self.add_to_index(index, item_or_items)

    async def lb_remove_from_index(
        self: _AsyncIndexCalls, index: str, item_or_items: str | Sequence[str]
    ) -> int:
        """Same as ``remove_from_index``."""
        return await self.remove_from_index(index, item_or_items)

    async def lb_get_index(self: _AsyncIndexCalls, index: str) -> list[str] | None:
        """Same as ``get_index``."""
        return await self.get_index(index)

    async def lb_list_indices(self: _AsyncIndexCalls) -> list[str]:
        """Same as ``list_indices``."""
        return await self.list_indices()


class Aliases:
    def lb_add_to_index(
        self: _IndexCalls, index: str, item_or_items: str | Sequence[str]
    ) -> int:
        """Same as ``add_to_index``."""
        return self.add_to_index(index, item_or_items)

    def lb_remove_from_index(
        self: _IndexCalls, index: str, item_or_items: str | Sequence[str]
    ) -> int:
        """Same as ``remove_from_index``."""
        return self.remove_from_index(index, item_or_items)

    def lb_get_index(self: _IndexCalls, index: str) -> list[str] | None:
        """Same as ``get_index``."""
        return self.get_index(index)

    def lb_list_indices(self: _IndexCalls) -> list[str]:
        """Same as ``list_indices``."""
        return self.list_indices()
