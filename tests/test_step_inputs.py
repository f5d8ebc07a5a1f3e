"""The staging layout of step inputs (acb/step_inputs.py)."""

from __future__ import annotations

import itertools

import torch

from acb.step_inputs import StepInputs


def test_every_field_a_kernel_reads_in_place_is_16_byte_aligned_for_any_step_size():
    """Triton compiles one kernel variant per alignment of its pointer arguments: fields packed back to back would
    change alignment with the parity of a step's sizes, and a fresh process would compile again at the first real
    step of the other parity. Every field starts on a 16-byte boundary, compact and fixed layouts alike."""
    inputs = StepInputs(max_tokens=64, max_rows=16, graph_rows=9, num_slots=16, max_blocks=4, block_size=8,
                        scratch_block=0, token_buf=torch.zeros(17, dtype=torch.int64),
                        device=torch.device("cpu"))  # fmt: skip
    layouts = [inputs.compact(t, n, s)[0] for t, n, s in itertools.product([1, 2, 5, 16, 33, 64], [1, 2, 3, 16],
                                                                            [0, 1, 2, 3])]  # fmt: skip
    for views in [*layouts, inputs.fixed_views]:
        for name, view in views.items():
            assert view.data_ptr() % 16 == 0, (name, view.data_ptr() % 16)
