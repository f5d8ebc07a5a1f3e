"""The staging layout of step inputs (acb/step_inputs.py), and the kernels that derive a step's inputs and take its
greedy samples on CUDA."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
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


def test_the_step_kernels_under_the_interpreter():
    """The kernel that derives a step's input ids, cache slots and block tables (against the torch derivation the
    CPU runs) and the graphs' greedy sample into the token buffer: their tests in tests/gpu/test_kernels.py, under
    Triton's interpreter."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    path = os.path.join(os.path.dirname(__file__), "gpu", "test_kernels.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", "step_indices or argmax_into"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:]
