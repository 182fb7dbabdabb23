"""The engine refuses a call naming a hash or block id twice: the worker
drops repeats from the saves one step batches."""

from __future__ import annotations

from pegaflow_connector.blockio import unique_refs as _unique_refs


def test_unique_refs_keeps_first_of_each_hash_and_block() -> None:
    ids, hashes = _unique_refs([1, 2, 3, 2, 4], [b"a", b"b", b"a", b"c", b"d"])
    assert ids == [1, 2, 4]
    assert hashes == [b"a", b"b", b"d"]


def test_unique_refs_passes_distinct_refs_through() -> None:
    assert _unique_refs([5, 6], [b"x", b"y"]) == ([5, 6], [b"x", b"y"])
