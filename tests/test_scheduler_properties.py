"""Stateful property tests of the scheduler and the block manager (hypothesis).

Any interleaving of add / step / step completion (up to three steps in flight, as under ``overlap_depth=3``) /
finish / cancel / preempt, with admission groups holding newcomers back under a backlog, keeps the books: owned +
free blocks = total, every block's reference count is the number of sequences holding it, every running sequence's
blocks cover what it computed, waiting sequences own nothing. Prompts share prefixes, so the prefix cache is busy:
a simulated device writes each completed step's tokens into its blocks, and every block the cache registered holds
exactly the tokens its hash was made of. And once nothing new arrives, every admitted sequence finishes.
"""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from acb.block_manager import BlockManager
from acb.config import SamplingParams
from acb.scheduler import Scheduler
from acb.sequence import SeqStatus, Sequence

BLOCKS, BLOCK_SIZE, EOS = 12, 4, 0


class SchedulerMachine(RuleBasedStateMachine):
    decode_steps = 1
    prefill_chunk_tokens = None

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockManager(BLOCKS, BLOCK_SIZE)
        self.sched = Scheduler(
            self.alloc,
            max_num_seqs=4,
            max_num_batched_tokens=16,
            admission_group=2,
            admission_max_delay=3,
            decode_steps=self.decode_steps,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
        )
        self.inflight: deque = deque()  # (step, its rows' block tables when scheduled)
        self.seqs: list[Sequence] = []
        self.device: dict[int, list] = {}  # block -> what the simulated device wrote at each offset
        self.sample_slots: list = []  # (sequence, slot its in-flight sample writes to), newest first

    @rule(backlog=st.integers(0, 3))
    def set_backlog(self, backlog):
        self.sched.backlog = backlog

    @rule(prompt=st.integers(1, 30), max_new=st.integers(1, 12), head=st.integers(1, 3), word=st.integers(7, 9))
    def add(self, prompt, max_new, head, word):
        if prompt + max_new - 1 > BLOCKS * BLOCK_SIZE:
            return  # admission rejects what can never fit (tested elsewhere)
        seq = Sequence(
            f"r{len(self.seqs)}",
            len(self.seqs),
            ([word] * head + [7] * prompt)[:prompt],  # shared prefixes, and a few distinct ones
            SamplingParams(max_new_tokens=max_new),
            max_model_len=10_000,
            eos_ids=frozenset({EOS}),
            seed=0,
        )
        self.seqs.append(seq)
        self.sched.add(seq)

    @precondition(lambda self: len(self.inflight) < 3)
    @rule()
    def step(self):
        decoding = {id(s) for s in self.sched.running if s.num_tokens_to_compute == 1}
        step = self.sched.schedule()
        if step is None:
            return
        assert step.num_tokens <= 16 and len(step.entries) <= 4
        cap = self.prefill_chunk_tokens
        if cap is not None and any(id(e.seq) in decoding for e in step.entries):  # running rows decode in it
            assert sum(e.num_tokens for e in step.entries if e.num_tokens > 1) <= cap
        if step.num_steps > 1:  # a round: every row decodes, within its length limit
            assert all(e.sample and 1 <= e.num_tokens <= step.num_steps for e in step.entries)
            assert all(e.start + e.num_tokens <= e.seq.max_len - 1 for e in step.entries)
        for e in step.entries:
            if step.num_steps > 1:  # a round's first input is known on the host or read from the token buffer
                if e.start >= len(e.seq.token_ids):
                    producers = [slot for st_, slot in self.sample_slots if st_ is e.seq]
                    assert producers and producers[0] == e.seq.slot, f"{e.seq} reads a token from the wrong slot"
                continue
            if e.start + e.num_tokens > len(e.seq.token_ids):
                # this entry reads its last input from the device token buffer: the in-flight step that samples
                # it must have written the same slot
                producers = [slot for st_, slot in self.sample_slots if st_ is e.seq]
                assert producers and producers[0] == e.seq.slot, f"{e.seq} reads a token from the wrong slot"
        self.sample_slots = [(e.seq, e.seq.slot) for e in step.entries if e.sample] + [
            x for x in self.sample_slots if x[0].num_pending
        ]
        self.inflight.append((step, [list(e.seq.block_table) for e in step.entries]))

    def _write(self, step, tables, failed: bool) -> None:
        """What the device does with a step: write each row's input tokens at its positions, in the blocks the row
        had when it was scheduled (garbage if the step failed)."""
        for e, table in zip(step.entries, tables):
            for p in range(e.start, e.start + e.num_tokens):
                known = p < len(e.seq.token_ids)
                self.device.setdefault(table[p // BLOCK_SIZE], [None] * BLOCK_SIZE)[p % BLOCK_SIZE] = (
                    "garbage" if failed or not known else e.seq.token_ids[p]
                )

    @precondition(lambda self: self.inflight)
    @rule(tokens=st.lists(st.integers(0, 20), min_size=8, max_size=8))
    def complete(self, tokens):
        step, tables = self.inflight.popleft()
        n = sum(e.sample for e in step.entries)
        row = tokens[:n] + [5] * max(0, n - len(tokens))
        self.sched.on_step_done(step, [row[j:] + row[:j] for j in range(step.num_steps)], None)
        self._write(step, tables, failed=False)  # a round's later inputs are its own samples, accepted just now

    @precondition(lambda self: self.inflight)
    @rule()
    def fail_step(self):
        step, tables = self.inflight.popleft()
        self._write(step, tables, failed=True)
        for seq in self.sched.on_step_failed(step):
            self.sched.finish(seq, "error")

    @rule(data=st.data())
    def cancel(self, data):
        live = [s for s in self.seqs if not s.is_finished]
        if live:
            self.sched.finish(data.draw(st.sampled_from(live)), "abort")

    @precondition(lambda self: self.sched.running)
    @rule()
    def preempt(self):
        self.sched._preempt(self.sched.running[-1])

    @invariant()
    def blocks_are_conserved_and_owned_once(self):
        owned = [b for s in self.seqs for b in s.block_table]
        assert len(set(owned)) + self.alloc.num_free == BLOCKS
        for b in range(BLOCKS):
            assert self.alloc.refs(b) == owned.count(b), (
                f"block {b}: {self.alloc.refs(b)} refs, {owned.count(b)} holders"
            )
        for s in self.seqs:
            if s.status is SeqStatus.RUNNING:
                assert len(s.block_table) * BLOCK_SIZE >= s.num_computed
                assert s.slot is not None
            else:
                assert s.block_table == [] and s.slot is None
        slots = [s.slot for s in self.sched.running]
        assert len(slots) == len(set(slots))

    @invariant()
    def in_flight_samples_match_pending_and_never_repeat_a_position(self):
        targets: dict[str, list[int]] = {}
        for step, _ in self.inflight:
            for e in step.entries:
                if e.sample and step.num_steps > 1:  # a round samples after each of its positions
                    targets.setdefault(e.seq.request_id, []).extend(range(e.start + 1, e.start + e.num_tokens + 1))
                elif e.sample:
                    targets.setdefault(e.seq.request_id, []).append(e.start + e.num_tokens)
        for s in self.seqs:
            t = targets.get(s.request_id, [])
            assert s.num_pending == len(t)
            assert len(t) == len(set(t)), f"{s} would sample position {t} twice"

    @invariant()
    def every_cached_block_holds_what_its_hash_says(self):
        for block, tokens in self.alloc._by_hash.values():
            assert self.device.get(block) == list(tokens), f"cached block {block} holds {self.device.get(block)}"

    @invariant()
    def queues_are_consistent(self):
        assert all(s.status is SeqStatus.RUNNING for s in self.sched.running)
        assert all(s.status is SeqStatus.WAITING for s in self.sched.waiting)
        arrivals = [s.arrival for s in self.sched.running]
        assert arrivals == sorted(arrivals)
        assert [s.arrival for s in self.sched.waiting] == sorted(s.arrival for s in self.sched.waiting)

    def teardown(self):
        """With no new arrivals, every admitted sequence finishes (no deadlock, no livelock)."""
        for _ in range(5_000):
            if not self.inflight and not self.sched.has_work:
                break
            step = self.sched.schedule() if len(self.inflight) < 3 else None
            if step is not None:
                self.inflight.append((step, [list(e.seq.block_table) for e in step.entries]))
            elif self.inflight:
                step, tables = self.inflight.popleft()
                self.sched.on_step_done(step, [[5] * sum(e.sample for e in step.entries)] * step.num_steps, None)
                self._write(step, tables, failed=False)
            else:
                raise AssertionError(f"stuck: nothing schedulable, nothing in flight: {self.sched.waiting}")
        assert all(s.is_finished for s in self.seqs)
        assert self.alloc.num_free == BLOCKS


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


class RoundsMachine(SchedulerMachine):
    """The same books with multi-step decode rounds of up to three positions per sequence."""

    decode_steps = 3


TestSchedulerWithRounds = RoundsMachine.TestCase
TestSchedulerWithRounds.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


class PrefillCapMachine(SchedulerMachine):
    """The same books with prompt tokens capped at 5 per step while a row decodes."""

    prefill_chunk_tokens = 5


TestSchedulerWithPrefillCap = PrefillCapMachine.TestCase
TestSchedulerWithPrefillCap.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
