"""The engine refuses a call naming a hash or block id twice: the worker
drops repeats from the saves one step batches (per KV cache group)."""

from __future__ import annotations

from pegaflow_connector.blockio import unique_refs as _unique_refs


def test_unique_refs_keeps_first_of_each_hash_and_block() -> None:
    ids, hashes, groups = _unique_refs([1, 2, 3, 2, 4], [b"a", b"b", b"a", b"c", b"d"])
    assert ids == [1, 2, 4]
    assert hashes == [b"a", b"b", b"d"]
    assert groups == [0, 0, 0]


def test_unique_refs_passes_distinct_refs_through() -> None:
    assert _unique_refs([5, 6], [b"x", b"y"]) == ([5, 6], [b"x", b"y"], [0, 0])


def test_unique_refs_are_per_group() -> None:
    """Block ids and hashes repeat across groups (one hash per group, block
    ids index each group's layers): none of those is a repeat."""
    ids, hashes, groups = _unique_refs([3, 3, 4, 3], [b"a", b"a", b"b", b"c"], [0, 1, 1, 1])
    assert (ids, hashes, groups) == ([3, 3, 4], [b"a", b"a", b"b"], [0, 1, 1])
