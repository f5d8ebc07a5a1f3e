"""Triton kernels of the GPU fast path: paged attention (decode and prefill; the decode kernel also applies rotary
and per-head q/k norms and writes the new keys and values), rotary + KV-cache write, fused residual + RMSNorm, SiLU·mul,
the decode steps' gate/up projection with its activation, the decode graphs' greedy argmax and transformers'
rotate-half rotary for the generic path (:mod:`.attention`, :mod:`.fused`); a step's derived inputs
(:mod:`.step`); the decode steps' output and down projections on Hopper, a warp-specialised Gluon kernel whose split-K
partial sums the next norm adds up (:mod:`.projection`); the one-shot all-reduce of tensor parallelism
(:mod:`.one_shot`).

The kernel modules need Triton (shipped with CUDA builds of torch); this package's own namespace does not, so the
CPU path can use the launch heuristics below. The plain-torch reference in :mod:`acb.attention` is the oracle the
tests hold these kernels to.
"""

from __future__ import annotations

import os

import torch

from ..errors import InvalidConfigError

__all__ = [
    "decode_splits",
    "pdl_choice",
    "pdl_launch",
    "pdl_words",
    "split_projections_on",
    "check_environment",
    "PDL_WAIT",
    "PDL_EARLY",
]


def decode_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = 132) -> int:
    """Context splits per sequence for :func:`acb.kernels.attention.paged_decode`: enough programs to fill the GPU
    twice, none shorter than one tile of 64 positions at ``max_context``, at most 32. The kernel sizes each split
    from the row's own length when it runs (whole tiles), so a shorter row leaves its last splits empty; a decode
    graph, which fixes the count for every row it will see, reads the engine's ``max_model_len`` here.

    The floor was 256 positions until session 21: it held models of one or two KV heads (Gemma 3 1B, Qwen2.5 1.5B)
    at 3 splits at 32 rows under a ``max_model_len`` of 784; with 9 and 5, their attention took 12 % and 5 % less GPU
    time per layer, about 3 % and 1 % of their decode steps (W-family, H200, docs/benchmarks.md, session 21)."""
    want = max(1, -(-2 * num_sms // max(1, batch * num_kv_heads)))
    return int(min(want, max(1, max_context // 64), 32))


PDL_WAIT = 1
"""PDL level 1: each kernel waits for the one before first thing and lets the next launch as its programs end."""
PDL_EARLY = 2
"""PDL level 2: each kernel also lets the next launch as soon as it has waited (``gdc_launch_dependents``), so the
next kernel's programs take the SMs it leaves free while it works: the split projections copy their first weight
boxes then, the others get their launch out of the way."""


def pdl_launch(on: int) -> dict:
    """Triton's launch option for a kernel launched under programmatic dependent launch (Hopper and later): it may
    start before the kernel before it in the stream ends, and waits for it (``gdc_wait``) before it reads what that
    kernel writes. Empty when ``on`` is 0 or false: a plain launch."""
    return {"launch_pdl": True} if on else {}


def pdl_choice(device: torch.device, tensor_parallel: bool) -> tuple[int, str | None]:
    """The PDL level at which acb's own kernels launch, on the lean path and the generic path (0: plain launches),
    and why not (None: they do).

    Under programmatic dependent launch a kernel may start before the kernel before it ends: its launch, and the
    split projections' first weight boxes, overlap that kernel's end, and it waits for it (``griddepcontrol.wait``)
    before it reads or writes anything the kernel before could touch. The norms, gate/up, attention (split and
    merge) and the split projections take it; cuBLAS's GEMMs keep plain launches, so a kernel after one starts only
    as it ends. Hopper or later, one rank (the all-reduces of tensor parallelism between them were not measured).
    ``ACB_PDL``: ``0`` off, ``1`` (:data:`PDL_WAIT`) or ``2`` (:data:`PDL_EARLY`, the default)."""
    level = _pdl_env()
    if device.type != "cuda":
        return 0, "not a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 0, "Triton's interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return 0, f"compute capability {major}.{minor} (programmatic dependent launch needs 9.0 or later)"
    if tensor_parallel:
        return 0, "tensor parallelism"
    if level == 0:
        return 0, "ACB_PDL=0"
    return level, None


def _pdl_env() -> int:
    """``ACB_PDL``'s level (default :data:`PDL_EARLY`); anything but 0, 1 or 2 is refused, on any device (a typo
    must not wait for the card to show)."""
    env = os.environ.get("ACB_PDL", str(PDL_EARLY))
    if env not in ("0", "1", "2"):
        raise InvalidConfigError(f"ACB_PDL is 0, 1 or 2, not {env!r}")
    return int(env)


def split_projections_on() -> bool:
    """``ACB_SPLIT_PROJECTIONS``: ``1`` (the default) lets the lean path's output and down projections run the
    split-K kernel where it can (:mod:`.projection`), ``0`` keeps cuBLAS; anything else is refused, on any device."""
    env = os.environ.get("ACB_SPLIT_PROJECTIONS", "1")
    if env not in ("0", "1"):
        raise InvalidConfigError(f"ACB_SPLIT_PROJECTIONS is 0 or 1, not {env!r}")
    return env == "1"


def pdl_words(level: int, reason: str | None) -> str:
    """:func:`pdl_choice`'s answer as ``path_reason`` says it."""
    return "programmatic dependent launch: " + (f"level {level}" if level else f"off ({reason})")


def check_environment() -> None:
    """Refuse a bad ``ACB_PDL`` or ``ACB_SPLIT_PROJECTIONS`` when an engine is built, whatever its device and path."""
    _pdl_env()
    split_projections_on()
