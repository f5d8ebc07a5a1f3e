"""The decode graphs' bucket sizes (the captures themselves run in tests/gpu)."""

import pytest

from acb.cuda_graphs import GRAPH_ROWS_MAX, graph_buckets, graph_rows


@pytest.mark.parametrize("max_num_seqs", [1, 3, 32, 256, 300, 512, 700, 1024, 4096])
def test_every_decode_batch_up_to_the_largest_graph_has_a_bucket(max_num_seqs):
    rows = graph_rows(max_num_seqs)
    assert rows == min(max_num_seqs, GRAPH_ROWS_MAX)
    buckets = graph_buckets(rows)
    assert buckets == sorted(set(buckets)) and buckets[-1] == rows
    for batch in range(1, rows + 1):
        padded = next(b for b in buckets if b >= batch)
        assert padded - batch < (32 if batch <= 512 else 64)  # padding rows cost compute at large batches
