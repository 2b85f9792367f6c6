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
    """One entry of a space's log. `seq` is 0-based and contiguous per space."""

    space: str
    seq: int
    type: str
    payload: dict[str, Any] = field(hash=False)
    recorded_at: datetime
    writer: str
    generation: int
    intent_id: str | None = None


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
