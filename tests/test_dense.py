"""The decode GEMM (acb/kernels/dense.py) and when the lean model takes it.

The kernel runs here under Triton's interpreter (its PDL instructions exist only on the card: tests/gpu runs them,
and the tensor-parallel tests there run the whole step with them)."""

import os
import subprocess
import sys

import pytest
import torch

from acb.kernels import use_decode_gemm

_DENSE = r"""
import torch
import torch.nn.functional as F
from acb.kernels.dense import MAX_ROWS, linear

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for m in (1, 5, 16, 33, MAX_ROWS):
        # (N, K): K below one tile, K not a multiple of the tile, N not a multiple of the tile, the wide tiles
        for n, k, bias in ((96, 64, False), (40, 200, True), (8200, 48, False), (64, 512, True)):
            x = torch.randn(m, k, dtype=dtype)
            w = torch.randn(n, k, dtype=dtype) / k**0.5
            b = torch.randn(n, dtype=dtype) if bias else None
            y = linear(x, w, b)
            want = F.linear(x.float(), w.float(), None if b is None else b.float())
            err = ((y.float() - want).abs().max() / want.abs().max()).item()
            assert y.dtype == dtype and y.shape == (m, n) and err < tol, (dtype, m, n, k, err)
            out = torch.full((m, n), float("nan"), dtype=dtype)
            assert linear(x, w, b, out=out) is out and torch.equal(out, y)
# rows with a stride (a slice of a wider buffer), and more rows than the kernel takes (cuBLAS then)
x = torch.randn(8, 96)[:, :64]
w = torch.randn(32, 64)
torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
x = torch.randn(MAX_ROWS + 1, 64)
out = torch.empty(MAX_ROWS + 1, 32)
b = torch.randn(32)
assert linear(x, w, b, out=out) is out
torch.testing.assert_close(out, F.linear(x, w, b))
print("ok")
"""


def test_the_decode_gemm_equals_f_linear():
    """Rows 1..64, K and N off the tile sizes, bias, ``out=``, float32 (exact products) and float16."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _DENSE], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_the_decode_gemm_choice(monkeypatch):
    """Never on the CPU; ``ACB_DECODE_GEMM`` must name a choice (a typo is an error, not a silent default)."""
    cpu = torch.device("cpu")
    for choice in ("auto", "cublas", "triton"):
        monkeypatch.setenv("ACB_DECODE_GEMM", choice)
        assert use_decode_gemm(cpu, tensor_parallel=True) is False
    monkeypatch.setenv("ACB_DECODE_GEMM", "cuBLAS")
    with pytest.raises(ValueError, match="ACB_DECODE_GEMM"):
        use_decode_gemm(cpu, tensor_parallel=False)
