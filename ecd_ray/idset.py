"""A compact set of string keys (seed ids, normalized instructions) for millions of entries.

A Python ``set[str]`` costs well over 100 bytes a key (the string object plus the hash-table
slot); with millions of seeds that dominates the driver's memory. :class:`IdSet` keeps only a
64-bit hash of each key, in a sorted NumPy ``uint64`` array plus a small pending Python set.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np

_EMPTY = np.zeros(0, dtype=np.uint64)
# What one pending entry costs besides its set slot: a Python int of up to 64 bits.
_INT_BYTES = sys.getsizeof(1 << 63)


def key_hash(key: str) -> int:
    """The 64-bit hash an :class:`IdSet` stores for ``key``: BLAKE2b-64 of its UTF-8 bytes."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _hash_array(keys: Iterable[str]) -> np.ndarray:
    return np.fromiter((key_hash(k) for k in keys), dtype=np.uint64)


def _chunks(keys: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(keys)
    while chunk := list(islice(it, size)):
        yield chunk


class IdSet:
    """A set of strings stored as 64-bit hashes: about 8-15 bytes a key instead of 100+.

    Layout: the merged part is a sorted, duplicate-free ``numpy.uint64`` array: 8 bytes a key,
    lookups by binary search. New hashes go to a pending Python ``set[int]`` first, which
    costs about 70-100 bytes an entry (a 36-byte int plus its hash-table slot); it is merged
    into the array once it holds more than ``max(min_pending, len(merged) // 16)`` entries,
    capped at ``max_pending``. With the defaults (4096 and 65536) the pending part is at most
    ~400 KiB below 64k keys and ~6.5 MiB above, and never more than 1/16 of the keys beyond
    that: about 8-15 bytes a key in all from 64k keys up, approaching 8 for millions. A merge
    briefly also holds the new array and a mask (about 9 more bytes a key for that instant).
    ``nbytes`` reports the current footprint.

    False positives: two distinct keys whose 64-bit hashes collide look like one key, so
    ``add`` of the second returns False and ``in`` reports it present. For seeds that means a
    distinct seed would be rejected as a duplicate (and a seed id counted as done or
    accounted for). By the birthday bound the chance of any collision among ``n`` keys is at
    most ``n**2 / 2**65``: about 3e-10 at 100k keys, 3e-6 at 10M keys, 3e-4 at 100M keys.
    There are no false negatives.
    """

    __slots__ = ("_merged", "_pending", "_min_pending", "_max_pending")

    def __init__(
        self, keys: Iterable[str] = (), *, min_pending: int = 4096, max_pending: int = 65536
    ) -> None:
        if min_pending < 1 or max_pending < min_pending:
            raise ValueError("need 1 <= min_pending <= max_pending")
        self._merged: np.ndarray = _EMPTY
        self._pending: set[int] = set()
        self._min_pending = min_pending
        self._max_pending = max_pending
        self.update(keys)

    # -- single keys -------------------------------------------------------------------------

    def _merged_has(self, h: int) -> bool:
        m = self._merged
        if not len(m):
            return False
        i = int(m.searchsorted(np.uint64(h)))  # the method: ~4x faster than np.searchsorted
        return i < len(m) and int(m[i]) == h

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        h = key_hash(key)
        return h in self._pending or self._merged_has(h)

    def add(self, key: str) -> bool:
        """Add ``key``; True if it was not in the set before (see the class docstring for
        the false-positive chance of a hash collision)."""
        h = key_hash(key)
        if h in self._pending or self._merged_has(h):
            return False
        self._pending.add(h)
        if len(self._pending) > self._pending_limit():
            self._merge()
        return True

    # -- many keys ---------------------------------------------------------------------------

    def _has_hashes(self, hashes: np.ndarray) -> np.ndarray:
        m = self._merged
        found = np.zeros(len(hashes), dtype=bool)
        if len(m):
            idx = np.searchsorted(m, hashes)
            inside = idx < len(m)
            found[inside] = m[idx[inside]] == hashes[inside]
        if self._pending:
            pending = self._pending
            found |= np.fromiter((h in pending for h in hashes.tolist()), dtype=bool,
                                 count=len(hashes))
        return found

    def contains_many(self, keys: Iterable[str]) -> np.ndarray:
        """A boolean array: for each key, in order, whether it is in the set."""
        return self._has_hashes(_hash_array(keys))

    def add_many(self, keys: Iterable[str]) -> np.ndarray:
        """Add every key; a boolean array, in order, True where the key was new (its first
        occurrence, when a key repeats within ``keys``). Vectorised: use it for big batches."""
        hashes = _hash_array(keys)
        new = np.zeros(len(hashes), dtype=bool)
        if not len(hashes):
            return new
        uniq, first = np.unique(hashes, return_index=True)
        fresh = ~self._has_hashes(uniq)
        new[first[fresh]] = True
        self._insert_sorted(uniq[fresh])
        return new

    def update(self, keys: Iterable[str]) -> int:
        """Add every key (streamed in chunks); the number of keys that were new."""
        added = 0
        for chunk in _chunks(keys, 65536):
            added += int(self.add_many(chunk).sum())
        return added

    # -- storage -----------------------------------------------------------------------------

    def _pending_limit(self) -> int:
        return min(self._max_pending, max(self._min_pending, len(self._merged) // 16))

    def _insert_sorted(self, values: np.ndarray) -> None:
        """Insert sorted, unique hashes that are in neither part of the set."""
        if len(values) > self._pending_limit():
            self._merge(values)
            return
        self._pending.update(values.tolist())
        if len(self._pending) > self._pending_limit():
            self._merge()

    def _merge(self, extra: np.ndarray = _EMPTY) -> None:
        pending = np.fromiter(self._pending, dtype=np.uint64, count=len(self._pending))
        self._pending = set()  # free the ints before the new array is allocated
        if len(extra):
            pending = np.concatenate([pending, extra])
        pending.sort()
        merged = self._merged
        self._merged = np.insert(merged, np.searchsorted(merged, pending), pending)

    def __len__(self) -> int:
        return len(self._merged) + len(self._pending)

    @property
    def nbytes(self) -> int:
        """Approximate bytes held: the merged array, plus the pending set and its ints."""
        pending = sys.getsizeof(self._pending) + _INT_BYTES * len(self._pending)
        return int(self._merged.nbytes) + pending + sys.getsizeof(self)

    def __repr__(self) -> str:
        return f"IdSet({len(self)} keys, ~{self.nbytes} bytes)"
