"""Where a git store keeps things: its refs under `refs/shard-sql/`, the encoding of space names
into ref paths, and the entry names of a tip's tree. docs/git.md explains the layout."""

from __future__ import annotations

import functools
import hashlib

NAMESPACE = "refs/shard-sql/"
FEED = NAMESPACE + "feed"
"""The feed: the last write's feed commit, whose tree holds every space's tip, the positions and
the checkpoints. Every write moves it (its one commit point)."""
SPACES = NAMESPACE + "spaces/"
"""`SPACES + <encoded space>`: the space's last commit (one commit per event), a copy of what the
feed says, for git's own tools."""
LEASES = NAMESPACE + "leases/"
"""`LEASES + <encoded space>`: a blob, the space's lease record."""
INTENT_REFS = NAMESPACE + "intents/"
"""`INTENT_REFS + <encoded space> + "/" + intent_key(intent_id)`: a pending forwarded intent."""
WAKEUPS_DIR = "shard-sql-wakeups"
"""The directory of the wake-up files (`shard_sql.wake`) in the git directory."""
HANDOFF_DIR = "shard-sql-handoff"
"""The directory of the holders' sockets for direct hand-offs (`shard_sql.handoff`)."""

CHUNK = 256
"""Seqs per `index/` blob: the tip's tree indexes whole chunks; at most CHUNK commits are walked."""
INDEX_TREE = "index"
"""Tip tree entry `index/<start>` (12 digits): the commit ids of seqs `start ..` (CHUNK of them)."""
INTENT_TREES = "intents-"
"""Tip tree entries `intents-<h[:2]>/<h[2:]>.<seq>` (empty blobs) index the intent ids."""

FEED_SPACES = "spaces"
"""Feed tree entry `spaces/<fan>/<entry name>/`: a space's `tip` (a commit entry), `positions`
(the positions of the seqs of its last, incomplete chunk, one per line) and `chunks/<start>`
(the positions of seqs `start ..` (CHUNK of them), for every complete chunk)."""
FEED_CHECKPOINTS = "checkpoints"
"""Feed tree entry `checkpoints/<fan>/<entry name>`: a blob, the checkpoint record."""

PIECE = 100
"""Longest path component of an encoded name (before its `+`)."""
MAX_READABLE = 900
"""Longest readable encoding; libgit2 takes ref names of at most 1023 bytes."""
HASHED = "="
"""Marks the encoding of a name too long to spell out: `=` and the SHA-256 of its UTF-8."""

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_HEX = frozenset("0123456789abcdef")


@functools.lru_cache(maxsize=4096)
def encode_name(name: str) -> str:
    """The ref path of a space name (below `spaces/`, `leases/` or `intents/`).

    Every UTF-8 byte outside `[a-z0-9_-]` becomes `%xx`; the text is cut into components of at
    most PIECE characters, each but the last ending in `+`; a spelling over MAX_READABLE
    characters becomes `=<sha256>` instead.
    """
    text = "".join(chr(b) if b in _SAFE else f"%{b:02x}" for b in name.encode("utf-8"))
    pieces: list[str] = []
    start = 0
    while len(text) - start > PIECE:
        end = start + PIECE
        if text[end - 1] == "%":
            end -= 1
        elif text[end - 2] == "%":
            end -= 2
        pieces.append(text[start:end] + "+")
        start = end
    pieces.append(text[start:])
    path = "/".join(pieces)
    if len(path) > MAX_READABLE:
        return HASHED + hashlib.sha256(name.encode("utf-8")).hexdigest()
    return path


def decode_name(path: str) -> str | None:
    """The space name of an encoded ref path, or None if it is not one `encode_name` makes.

    A hashed encoding (a long name) cannot be decoded from the ref alone: None as well.
    """
    parts = path.split("/")
    if any(not p.endswith("+") for p in parts[:-1]) or not parts[-1] or parts[-1].endswith("+"):
        return None
    text = "".join(p[:-1] for p in parts[:-1]) + parts[-1]
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            code = text[i + 1 : i + 3]
            if len(code) != 2 or not set(code) <= _HEX:
                return None
            out.append(int(code, 16))
            i += 3
        else:
            out += c.encode("ascii", "replace")
            i += 1
    try:
        name = out.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if encode_name(name) == path else None


def entry_name(name: str) -> str:
    """The tree entry of a space or checkpoint name in the feed: its encoding without the `/`
    (each one follows a `+`, and only those do, so it comes back by `entry_path`)."""
    return encode_name(name).replace("/", "")


def entry_path(entry: str) -> str:
    """The encoding of the name whose tree entry is `entry`."""
    return entry.replace("+", "+/")


def fan(name: str) -> str:
    """The fan-out directory of a name in the feed's tree: 2 hex digits of its SHA-256."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:2]


def space_ref(space: str) -> str:
    """The ref of the space's last event commit."""
    return SPACES + encode_name(space)


def lease_ref(space: str) -> str:
    """The ref of the space's lease record."""
    return LEASES + encode_name(space)


def intent_key(intent_id: str) -> str:
    """The SHA-256 of an intent id's UTF-8, in hex: its name in refs and in the tip's tree."""
    return hashlib.sha256(intent_id.encode("utf-8")).hexdigest()


def is_intent_key(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX


def intents_dir(space: str) -> str:
    """The ref directory of the space's pending intents (ends with `/`)."""
    return INTENT_REFS + encode_name(space) + "/"


def intent_ref(space: str, intent_id: str) -> str:
    """The ref of a pending forwarded intent."""
    return intents_dir(space) + intent_key(intent_id)


def intent_entry(intent_id: str) -> tuple[str, str]:
    """Where the tip's tree records `intent_id`: `intents-<first>/<rest>.<seq>`."""
    h = intent_key(intent_id)
    return h[:2], h[2:]
