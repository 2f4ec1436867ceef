"""Helpers shared by the Message DB compatibility tests (independent re-implementations
of Message DB's stream-name and hashing rules, used as test oracles)."""

from __future__ import annotations

import hashlib
import struct

from psycopg.conninfo import make_conninfo


def as_user(url: str, user: str) -> str:
    """The same database, connecting as another role."""
    return make_conninfo(url, user=user)


def md_hash_64(value: str) -> int:
    """Message DB's hash_64, computed independently: the first 8 bytes of md5 as a
    big-endian signed 64-bit integer."""
    return struct.unpack(">q", hashlib.md5(value.encode("utf-8")).digest()[:8])[0]


def md_cardinal_id(stream_name: str) -> str | None:
    if "-" not in stream_name:
        return None
    return stream_name.split("-", 1)[1].split("+", 1)[0]


def md_consumer_member(stream_name: str, size: int) -> int | None:
    """Which member of a consumer group of `size` reads this stream (None: no member)."""
    cid = md_cardinal_id(stream_name)
    if cid is None:
        return None
    return abs(md_hash_64(cid)) % size
