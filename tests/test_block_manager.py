from __future__ import annotations

import pytest

from acb.block_manager import BlockManager, OutOfBlocksError


def test_allocate_and_free_round_trip():
    a = BlockManager(8, block_size=4)
    x = a.allocate(3)
    y = a.allocate(5)
    assert sorted(x + y) == list(range(8))
    assert a.num_free == 0 and not a.can_allocate(1)
    with pytest.raises(OutOfBlocksError):
        a.allocate(1)
    a.free(x)
    assert a.num_free == 3
    with pytest.raises(RuntimeError, match="twice"):
        a.free(x)


def test_blocks_for():
    a = BlockManager(4, block_size=16)
    assert [a.blocks_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


class _Seq:
    def __init__(self, tokens):
        self.token_ids = tokens
        self.block_table: list[int] = []
        self.num_hashed, self.prefix_hash = 0, None


def test_full_blocks_are_cached_by_content_and_shared():
    m = BlockManager(8, block_size=4)
    a = _Seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    m.extend(a, 3)
    m.commit_seq(a, upto=9)  # two full blocks computed; the third is partial and stays private
    assert m.num_cached == 2
    cached, parent = m.match([1, 2, 3, 4, 5, 6, 7, 8, 0, 0], limit=9)
    assert cached == a.block_table[:2] and parent == a.prefix_hash
    assert m.match([1, 2, 3, 4, 9, 9, 9, 9], limit=8)[0] == a.block_table[:1]  # the chain stops where content differs
    assert m.match([9, 2, 3, 4], limit=4)[0] == []
    assert m.match([1, 2, 3, 4, 5, 6, 7, 8], limit=7)[0] == a.block_table[:1]  # never past the limit
    b = _Seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    m.reuse(b, cached, parent)
    assert [m.refs(x) for x in a.block_table] == [2, 2, 1]
    m.release(a)
    assert [m.refs(x) for x in b.block_table] == [1, 1] and m.num_free == 6


def test_free_cached_blocks_are_reused_only_after_empty_ones_least_recently_freed_first():
    m = BlockManager(4, block_size=2)
    old, new = _Seq([1, 1]), _Seq([2, 2])
    for s in (old, new):
        m.extend(s, 1)
        m.commit_seq(s, upto=2)
        m.release(s)  # freed, content kept
    assert m.num_free == 4 and m.num_cached == 2
    fresh = m.allocate(2)  # the two empty blocks first: both cached prefixes survive
    assert m.num_cached == 2 and m.stats.evictions == 0
    m.allocate(1)  # now the least recently freed cached block (old's) goes
    assert m.stats.evictions == 1
    assert m.match([1, 1], limit=2)[0] == [] and m.match([2, 2], limit=2)[0] != []
    m.free(fresh)
    assert m.clear() == 1 and m.num_cached == 0 and m.num_free == 3


def test_the_same_content_computed_twice_is_cached_once():
    m = BlockManager(4, block_size=2)
    a, b = _Seq([5, 5, 6]), _Seq([5, 5, 7])
    for s in (a, b):
        m.extend(s, 2)
    m.commit_seq(a, upto=2)
    m.commit_seq(b, upto=2)  # the same first block: b's copy stays private
    assert m.num_cached == 1 and m.match([5, 5, 0], limit=2)[0] == a.block_table[:1]
    m.release(a)
    m.release(b)
    assert m.num_free == 4
