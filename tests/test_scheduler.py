"""The scheduler on its own: pure Python, no model."""

from __future__ import annotations

import pytest

from acb.block_manager import BlockManager
from acb.config import SamplingParams
from acb.scheduler import Scheduler
from acb.sequence import SeqStatus, Sequence


def _seq(i: int, prompt_len: int, max_new: int = 4) -> Sequence:
    return Sequence(
        f"r{i}",
        i,
        list(range(100 * i + 1, 100 * i + prompt_len + 1)),  # distinct prompts: no prefix is shared
        SamplingParams(max_new_tokens=max_new),
        max_model_len=1000,
        eos_ids=frozenset(),
        seed=0,
    )


def _sched(blocks=100, block_size=4, seqs=8, budget=16) -> Scheduler:
    return Scheduler(BlockManager(blocks, block_size), seqs, budget)


def _finish_step(s: Scheduler, step, token=7):
    n = sum(e.sample for e in step.entries)
    return s.on_step_done(step, [[token] * n], None).accepted


def test_chunked_prefill_respects_the_token_budget_and_mixes_with_decode():
    s = _sched(budget=16)
    a, b = _seq(0, 3), _seq(1, 40)
    s.add(a)
    s.add(b)
    step = s.schedule()
    assert [(e.seq.request_id, e.num_tokens, e.sample) for e in step.entries] == [("r0", 3, True), ("r1", 13, False)]
    _finish_step(s, step)
    step = s.schedule()  # a decodes (1 token) while b's prompt continues in the rest of the budget
    assert [(e.seq.request_id, e.start, e.num_tokens) for e in step.entries] == [("r0", 3, 1), ("r1", 13, 15)]
    assert step.num_tokens == 16


def test_an_older_prompt_never_takes_a_decodes_place():
    """A prompt older than the rows decoding beside it (here: it arrived first but starts late, as one resumed after
    preemption does) gets the budget minus one token for each of them, not the whole budget."""
    s = _sched(budget=8)
    a, b, c = _seq(0, 30), _seq(1, 2), _seq(2, 2)
    s.add(b)
    s.add(c)
    _finish_step(s, s.schedule())  # b and c's prompts: they decode from now on
    s.add(a)
    step = s.schedule()
    assert [(e.seq.request_id, e.num_tokens) for e in step.entries] == [("r1", 1), ("r2", 1), ("r0", 6)]
    _finish_step(s, step)
    step = s.schedule()  # a runs first now (oldest), and still leaves b and c their token
    assert [(e.seq.request_id, e.num_tokens) for e in step.entries] == [("r0", 6), ("r1", 1), ("r2", 1)]


def test_prefill_chunk_tokens_caps_prompt_tokens_while_rows_decode():
    s = Scheduler(BlockManager(100, 4), 8, 32, prefill_chunk_tokens=5)
    a = _seq(0, 3)
    s.add(a)
    step = s.schedule()  # nothing decodes: the prompt takes what it needs of the whole budget
    assert [(e.seq.request_id, e.num_tokens) for e in step.entries] == [("r0", 3)]
    _finish_step(s, step)
    b = _seq(1, 40)
    s.add(b)
    for _ in range(3):  # a decodes; b's prompt arrives in chunks of 5
        step = s.schedule()
        assert [(e.seq.request_id, e.num_tokens) for e in step.entries] == [("r0", 1), ("r1", 5)]
        _finish_step(s, step)
    s.finish(a, "abort")
    step = s.schedule()  # nothing decodes any more: b's prompt gets the whole budget again
    assert [(e.seq.request_id, e.num_tokens) for e in step.entries] == [("r1", 25)]


def test_fifo_admission_never_skips_the_head():
    s = _sched(blocks=10, block_size=4, budget=1000)
    big, small = _seq(0, 45), _seq(1, 2)  # big needs 12 blocks > 10 free right now... but fits in the cache later
    s.add(big)
    s.add(small)
    assert s.schedule() is None  # small must not overtake big


def test_max_num_seqs_caps_the_batch():
    s = _sched(seqs=2, budget=100)
    for i in range(4):
        s.add(_seq(i, 2))
    step = s.schedule()
    assert len(step.entries) == 2 and len(s.waiting) == 2


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_takes_the_newest_and_recomputes_it_later(prefix_caching):
    s = Scheduler(BlockManager(4, 4, prefix_caching=prefix_caching), 8, 100)
    old, new = _seq(0, 7, max_new=10), _seq(1, 7, max_new=10)
    s.add(old)
    s.add(new)
    step = s.schedule()  # 2 blocks each: the cache is full
    assert len(step.entries) == 2 and s.blocks.num_free == 0
    _finish_step(s, step)  # positions 0..6 computed, token 7 sampled for each
    step = s.schedule()  # both decode position 7 (still within their second block)
    _finish_step(s, step)
    step = s.schedule()  # position 8 needs a third block: the newest is preempted
    assert [e.seq for e in step.entries] == [old]
    assert new.status is SeqStatus.WAITING and new.num_computed == 0 and new.block_table == []
    assert s.num_preemptions == 1
    _finish_step(s, step)
    # once old finishes, new is recomputed from all its tokens (prompt + the 2 it had generated); with prefix caching
    # its first full block, freed by the preemption but not reused since, still holds its content
    s.finish(old, "abort")
    step = s.schedule()
    start = 4 if prefix_caching else 0
    assert [(e.seq, e.start, e.num_tokens, e.sample) for e in step.entries] == [(new, start, 9 - start, True)]


def test_overlap_schedules_from_pending_tokens_and_drops_the_extra_token():
    s = _sched(budget=100)
    a = _seq(0, 5, max_new=3)
    s.add(a)
    s1 = s.schedule()
    assert a.num_pending == 1
    s2 = s.schedule()  # scheduled before s1's token reached the host: decodes position 5 from the device buffer
    assert [(e.start, e.num_tokens, e.sample) for e in s2.entries] == [(5, 1, True)]
    out = s.on_step_done(s1, [[9]], None).accepted
    assert [(ids, reason) for _, ids, _, reason, _, _ in out] == [([9], None)]
    s.finish(a, "stop")  # e.g. a stop string in token 9: s2's sample is the extra token
    out = s.on_step_done(s2, [[11]], None)
    assert out.accepted == [] and out.broken == []
    assert a.token_ids[-1] == 9 and s.blocks.num_free == 100


def test_a_sequence_at_its_length_limit_is_not_scheduled_again():
    s = _sched(budget=100)
    a = _seq(0, 5, max_new=2)
    s.add(a)
    s1 = s.schedule()
    s2 = s.schedule()  # decode for the second (last) token
    assert s.schedule() is None  # the last token is never fed back
    _finish_step(s, s1)
    out = _finish_step(s, s2)
    assert out[0][3] == "length" and a.is_finished


def _decoding(group: int, delay: int, backlog: int) -> Scheduler:
    """A scheduler whose two sequences are past their prompts (decoding), with admission groups on."""
    s = Scheduler(BlockManager(100, 4), 8, 64, admission_group=group, admission_max_delay=delay)
    s.add(_seq(0, 3, max_new=50))
    s.add(_seq(1, 3, max_new=50))
    _finish_step(s, s.schedule())
    s.backlog = backlog
    return s


def test_under_a_backlog_new_sequences_start_in_groups_while_the_batch_decodes():
    s = _decoding(group=2, delay=10, backlog=5)
    s.add(_seq(2, 3))
    step = s.schedule()  # one waiting < group of two: held, the step stays decode-only (a CUDA graph on the GPU)
    assert [e.seq.request_id for e in step.entries] == ["r0", "r1"] and all(e.num_tokens == 1 for e in step.entries)
    _finish_step(s, step)
    s.add(_seq(3, 3))
    step = s.schedule()  # the group is full: both start together, in one eager step
    assert [e.seq.request_id for e in step.entries] == ["r0", "r1", "r2", "r3"]


def test_a_held_sequence_starts_after_the_delay_even_if_its_group_never_fills():
    s = _decoding(group=4, delay=3, backlog=5)
    s.add(_seq(2, 3))
    for _ in range(3):
        step = s.schedule()
        assert "r2" not in [e.seq.request_id for e in step.entries]
        _finish_step(s, step)
    assert "r2" in [e.seq.request_id for e in s.schedule().entries]


def test_without_a_backlog_a_request_starts_at_once():
    s = _decoding(group=4, delay=10, backlog=0)
    s.add(_seq(2, 3))
    assert "r2" in [e.seq.request_id for e in s.schedule().entries]


def test_a_step_that_prefills_anyway_admits_at_once():
    s = Scheduler(BlockManager(100, 4), 8, 64, admission_group=4, admission_max_delay=10)
    s.add(_seq(0, 100))
    s.backlog = 5
    _finish_step(s, s.schedule())  # the first 64 tokens of r0's prompt
    s.add(_seq(1, 3))
    # r0's prompt is still prefilling: the step is eager anyway, so a newcomer joins without waiting for a group
    step = s.schedule()
    assert [(e.seq.request_id, e.num_tokens) for e in step.entries] == [("r0", 36), ("r1", 3)]
