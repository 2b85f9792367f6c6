"""The rule for names (spaces, types, holders, intent ids): one fixed list of refused
characters, the same on every Python version. README "Input rules" says what and why."""

from __future__ import annotations

import re

from shard_sql.errors import InvalidEvent

MAX_SPACE_LENGTH = 200
"""A space name is 1 to 200 characters."""
MAX_TYPE_LENGTH = 200
"""An event type is 1 to 200 characters."""
MAX_INTENT_ID_LENGTH = 200
"""An intent id is 1 to 200 characters."""


def _not_in_names() -> re.Pattern[str]:
    """The characters a name may not hold: one fixed list, the same on every Python version
    (it never asks `unicodedata`, whose tables grow with each Unicode version). See README
    "Input rules" for what is refused and why."""
    refused = [
        "\x00-\x1f\x7f-\x9f",  # C0 and C1 control characters, DEL
        "\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000",  # white space but ' '
        "\u00ad\u061c\u180e\u200b\u2060-\u206f\ufeff\ufff9-\ufffb\U000e0001",  # invisible
        "\u200e\u200f\u202a-\u202e",  # bidirectional controls (with U+061C, U+2066-U+2069)
        "\ud800-\udfff",  # surrogates
        "\ue000-\uf8ff\U000f0000-\U0010ffff",  # private use (planes 15 and 16 entirely)
        "\ufdd0-\ufdef",  # noncharacters, and U+nFFFE, U+nFFFF of every plane:
        "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(15)),
    ]
    return re.compile("[" + "".join(refused) + "]")


_NOT_IN_NAMES = _not_in_names()
CHECKED_NAMES: set[str] = set()
"""Names that passed `_check_name` (all but its length check): spaces and types repeat."""


def check_name(field: str, value: object, max_length: int, remember: bool = True) -> str:
    if type(value) is str and value in CHECKED_NAMES and len(value) <= max_length:
        return value
    if not isinstance(value, str):
        raise InvalidEvent(field, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidEvent(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidEvent(field, f"is {len(value)} characters long, at most {max_length}")
    if not (value.isascii() and value.isprintable()):  # printable ASCII: the same everywhere
        found = _NOT_IN_NAMES.search(value)
        if found is not None:
            ch = found.group()
            raise InvalidEvent(field, f"contains the character {ch!r} (U+{ord(ch):04X})")
    if remember and type(value) is str:
        if len(CHECKED_NAMES) >= 1024:
            CHECKED_NAMES.clear()
        CHECKED_NAMES.add(value)
    return value


def check_stored_space(space: object) -> str:
    """The space of a read (`events`, `head`, a lease): any string that can name a stored
    space. Names already stored are never checked against the name rule again (they were
    written under the rule of their day); one that cannot be stored is simply not found."""
    return _check_stored("space", space)


def check_stored_type(type_: object) -> str:
    """A type given to a read (a feed's filter): see `check_stored_space`."""
    return _check_stored("type", type_)


def _check_stored(field: str, value: object) -> str:
    if type(value) is str and value in CHECKED_NAMES:
        return value
    if not isinstance(value, str):
        raise InvalidEvent(field, f"must be a string, not {type(value).__name__}")
    if not 0 < len(value) <= MAX_SPACE_LENGTH or "\x00" in value:
        raise InvalidEvent(field, "names nothing stored (empty, too long or holding NUL)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidEvent(field, "is not valid Unicode (lone surrogate)") from e
    return value


def check_text(field: str, value: object) -> str:
    """A name such as a holder or node id: the rule of space names."""
    return check_name(field, value, MAX_SPACE_LENGTH)


def check_space(space: object) -> str:
    """A space to write: 1 to 200 characters, none of `_NOT_IN_NAMES`."""
    if type(space) is str and space in CHECKED_NAMES and len(space) <= MAX_SPACE_LENGTH:
        return space
    return check_name("space", space, MAX_SPACE_LENGTH)


def check_type(type_: object) -> str:
    """An event type to write: the rule of space names."""
    return str(check_name("type", type_, MAX_TYPE_LENGTH))


def check_intent_id(intent_id: object) -> str | None:
    if intent_id is None:
        return None
    # Not remembered: intent ids seldom repeat.
    return check_name("intent_id", intent_id, MAX_INTENT_ID_LENGTH, remember=False)
