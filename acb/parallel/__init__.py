"""Tensor parallelism: one model split over ``N`` processes (one GPU each), driven by the engine's process.

The event loop, the scheduler and sampling live in the user's process, which runs rank 0. Ranks 1..N-1 are worker
processes that acb starts (:mod:`acb.parallel.workers`): each holds its shard of the lean model
(:mod:`acb.parallel.shard`: attention heads and MLP columns split, vocabulary-parallel embedding and logits) and its
shard of the KV cache (its KV heads), and replays every forward rank 0 runs. Each step, rank 0 broadcasts the step's
staged input buffer, its block-table entries and the token buffer; the forward then meets in one all-reduce after
attention, one after the MLP, and one all-gather of the logits (:mod:`acb.parallel.group`).
"""

from .group import Group
from .shard import shard_spec
from .workers import TensorParallel

__all__ = ["Group", "TensorParallel", "shard_spec"]
