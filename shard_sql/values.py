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


def _event_factory() -> Any:
    """`Event(...)` built through the slot descriptors: the same frozen value, without the
    frozen dataclass's `__init__` (half the cost; stores build one per event written)."""
    fields = (
        "space",
        "seq",
        "type",
        "payload",
        "recorded_at",
        "writer",
        "generation",
        "intent_id",
        "position",
    )
    try:
        s0, s1, s2, s3, s4, s5, s6, s7, s8 = (getattr(Event, f).__set__ for f in fields)
    except AttributeError:  # not a slots class any more: the plain constructor
        return Event
    new = object.__new__

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
        e: Event = new(Event)
        s0(e, space)
        s1(e, seq)
        s2(e, type_)
        s3(e, payload)
        s4(e, recorded_at)
        s5(e, writer)
        s6(e, generation)
        s7(e, intent_id)
        s8(e, position)
        return e

    return make


new_event: Any = _event_factory()
"""Internal: `Event(space, seq, type, payload, recorded_at, writer, generation, intent_id,
position=None)`, all arguments positional and already checked."""
