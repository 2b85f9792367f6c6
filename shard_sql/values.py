"""Domain values: plain frozen dataclasses, no storage imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    """Built-in wiki event types. Any non-empty string is accepted as a type too."""

    ALIAS_SET = "alias.set"
    BINDING_MADE = "binding.made"
    PAGE_FORKED = "page.forked"
    PAGE_CREATED = "page.created"
    PAGE_EDITED = "page.edited"


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a space's log. `seq` is 0-based and contiguous per space.

    `position` is the event's place in the store-wide feed; None until the feed placed it (an
    adapter may place events just after their commit). It takes no part in equality: the event
    an append returned and the same event read from the feed later are equal.
    """

    space: str
    seq: int
    type: str
    payload: dict[str, Any] = field(hash=False)
    recorded_at: datetime
    writer: str
    generation: int
    intent_id: str | None = None
    position: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to append to `space` until `expires_at`.

    `generation` is the fencing token: it grows by one at each new grant; a renewal keeps it.
    """

    space: str
    holder: str
    expires_at: datetime
    generation: int

    def valid_at(self, now: datetime) -> bool:
        return now < self.expires_at


def slots_twin(cls: type) -> Any:
    """A plain class with the slots of the frozen, slotted dataclass `cls`: an instance of it has
    its fields set by ordinary (fast) attribute stores, then becomes a `cls` by assigning its
    `__class__` (same layout). Builds the same frozen value as `cls(...)`, without the frozen
    `__init__`'s `object.__setattr__` per field, and without calling each slot's `__set__`
    (which packs its arguments in a tuple). None when the interpreter refuses the swap (then
    build through the class)."""
    names = getattr(cls, "__slots__", None)
    if not isinstance(names, tuple):
        return None
    twin = type(f"_{cls.__name__}Fields", (), {"__slots__": names, "__module__": __name__})
    try:
        probe: Any = object.__new__(twin)
        probe.__class__ = cls
    except TypeError:
        return None
    return twin


def _event_factory() -> Any:
    """`Event(...)` built through `slots_twin`: the same frozen value for a quarter of the cost
    (3.9k instructions, 8.6k through the slots' `__set__`, 14.9k for `Event(...)`); stores build
    one per event written or read."""
    twin = slots_twin(Event)
    if twin is None:
        return Event
    new, cls = object.__new__, Event

    def make(
        space: str,
        seq: int,
        type_: str,
        payload: dict[str, Any],
        recorded_at: datetime,
        writer: str,
        generation: int,
        intent_id: str | None,
        position: int | None = None,
    ) -> Event:
        e = new(twin)
        e.space = space
        e.seq = seq
        e.type = type_
        e.payload = payload
        e.recorded_at = recorded_at
        e.writer = writer
        e.generation = generation
        e.intent_id = intent_id
        e.position = position
        e.__class__ = cls
        return e  # type: ignore[no-any-return]

    return make


new_event: Any = _event_factory()
"""Internal: `Event(space, seq, type, payload, recorded_at, writer, generation, intent_id,
position=None)`, all arguments positional and already checked."""
