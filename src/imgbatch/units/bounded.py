"""Reading a file whose size is bounded, holding only what it holds.

Takes an open binary stream, the most bytes a caller accepts and the size the file said it had;
gives at most one byte more than the bound (so that the caller can tell a file too large), read
as it comes. `stream.read(limit + 1)` would do the same in one call but allocates the whole
bound first (CPython's buffered read does): 64 MiB for a manifest of a few hundred bytes.

    >>> import io
    >>> read_at_most(io.BytesIO(b"version: 1"), 64 * 2**20, 10)
    b'version: 1'
    >>> len(read_at_most(io.BytesIO(bytes(100)), 10))
    11
"""

from __future__ import annotations

from typing import BinaryIO

# After the size the file stated: a file that grew since is read on in pieces this large.
_PIECE = 64 * 1024


def read_at_most(stream: BinaryIO, limit: int, expected: int = 0) -> bytes:
    """Up to `limit + 1` bytes of `stream`: first the `expected` size (what fstat said) and one
    more, then, if it grew, piece by piece; never more memory than the bytes read and a piece."""
    parts: list[bytes] = []
    left = limit + 1
    want = min(left, max(expected, 0) + 1)
    while left > 0:
        part = stream.read(want)
        if not part:
            break
        parts.append(part)
        left -= len(part)
        if len(part) < want:
            break  # the end of the file (a buffered read returns short only there)
        want = min(left, _PIECE)
    return b"".join(parts)
