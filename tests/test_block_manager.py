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
