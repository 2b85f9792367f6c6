"""`AppendAuthority.transaction()`: a store transaction whose writes are fenced by the node's
leases. What it may do with spaces the node holds, and why forwarding cannot join a transaction:
docs/embedding.md, "Appending with the authority"."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from shard_sql.errors import InvalidEvent
from shard_sql.ports import Item, Transaction
from shard_sql.store_base import TransactionState
from shard_sql.values import Event, Lease

__all__ = ["NodeTransaction", "TransactionNode"]


class TransactionNode(Protocol):
    """What a node transaction uses of its `AppendAuthority` (named here, so that the
    authority imports this module and not the other way round)."""

    def lease_for_transaction(self, space: str) -> Lease: ...

    def forget_heads(self, spaces: Iterable[str]) -> None: ...


class NodeTransaction(Transaction):
    """The `Transaction` of `node.transaction(connection)`: `append` and `append_many` write to
    a space under this node's lease, as `fence=` (the store checks it in the transaction).

    - A space this node holds: its lease, no round trip (not renewed here: a renewal is a
      write, and the node's serving thread or its next append renews it).
    - An unleased space: the node acquires it first (a lease grant: a write of its own, committed
      at once). On SQLite, whose one writer is this transaction once it wrote, acquire such
      spaces before the block's first write (`node.acquire(space)`, or write to them first).
    - A space another node holds: `LeaseHeld` naming that node. A forwarded append is written by
      the holder in its own transaction, which cannot join this one: write it after the block
      with `node.append`, or leave the block to the holder.

    Either error dooms the transaction like any failed write. `save_checkpoint` and
    `connection` are the store transaction's.
    """

    def __init__(self, node: TransactionNode, inner: AbstractContextManager[Transaction]) -> None:
        self._node = node
        self._inner = inner
        self._tx: Transaction | None = None
        self._spaces: set[str] = set()

    def __enter__(self) -> NodeTransaction:
        self._tx = self._inner.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return self._inner.__exit__(exc_type, exc, tb)
        finally:
            self._node.forget_heads(self._spaces)  # written past the node's known heads

    @property
    def connection(self) -> Any:
        """The store transaction's `connection` (SQL stores)."""
        return getattr(self._open(), "connection")  # noqa: B009 - SQL transactions only

    def _open(self) -> Transaction:
        tx = self._tx
        if tx is None:
            raise InvalidEvent("transaction", "use it inside its with block")
        return tx

    def _lease(self, tx: Transaction, space: str, fence: Lease | None) -> Lease:
        if fence is not None:
            return fence
        state = getattr(tx, "state", None)
        if isinstance(state, TransactionState):
            state.check_open()
        try:
            lease = self._node.lease_for_transaction(space)
        except BaseException as e:
            if isinstance(state, TransactionState):
                state.failed(e)  # the transaction is doomed as by a failed write
            raise
        self._spaces.add(space)
        return lease

    def append(
        self,
        space: str,
        type: str,
        payload: dict[str, Any],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
        intent_id: str | None = None,
    ) -> Event:
        """`tx.append` fenced by this node's lease on `space` (or by `fence`, when given)."""
        tx = self._open()
        lease = self._lease(tx, space, fence)
        return tx.append(
            space, type, payload, expected_seq=expected_seq, fence=lease, intent_id=intent_id
        )

    def append_many(
        self,
        space: str,
        items: Iterable[Item],
        *,
        expected_seq: int | None = None,
        fence: Lease | None = None,
    ) -> list[Event]:
        """`tx.append_many` fenced by this node's lease on `space` (or by `fence`)."""
        tx = self._open()
        lease = self._lease(tx, space, fence)
        return tx.append_many(space, items, expected_seq=expected_seq, fence=lease)

    def save_checkpoint(self, name: str, position: int, *, fence: Lease | None = None) -> None:
        self._open().save_checkpoint(name, position, fence=fence)
