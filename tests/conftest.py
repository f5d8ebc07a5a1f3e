"""Shared fixtures: tiny random models, the offline tokenizer, reference generation, and the loop matrix.

Every async test runs twice, on plain asyncio and on uvloop (pytest-asyncio's loop-factory hook).
"""

from __future__ import annotations

import asyncio
import copy
import faulthandler
import os
import threading

import pytest
import torch

from acb.default_model import default_tokenizer, tiny_model

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency; keep the suite usable without it
    uvloop = None


def pytest_addoption(parser):
    parser.addoption("--soak-long", action="store_true", help="run the chaos soak with 10,000 requests (CI: 2,000)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "loops(*names): run this async test on these event loops only (long tests: one loop is enough)"
    )


def pytest_asyncio_loop_factories(config, item):
    factories = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    marker = item.get_closest_marker("loops") if item is not None else None
    if marker is not None:
        factories = {k: v for k, v in factories.items() if k in marker.args} or {"asyncio": asyncio.new_event_loop}
    return factories


@pytest.fixture(autouse=True)
def dump_stacks_of_a_hung_test(request):
    """With ``ACB_TEST_DUMP_S`` set (device calls, see bench/*_session.sh): a test still running after that many
    seconds writes every thread's stack, with its name, to ``$ACB_TEST_DUMP_DIR/stacks.log`` (pytest captures
    stderr, and a call killed at its time limit loses the capture)."""
    seconds = float(os.environ.get("ACB_TEST_DUMP_S", 0))
    if not seconds:
        yield
        return
    path = os.path.join(os.environ.get("ACB_TEST_DUMP_DIR", "."), "stacks.log")
    with open(path, "a") as f:
        f.write(f"== {request.node.nodeid}\n")
        f.flush()
        faulthandler.dump_traceback_later(seconds, file=f)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def tokenizer():
    return default_tokenizer()


@pytest.fixture
def make_model():
    """``make_model(arch, seed)`` -> ``(engine_model, reference_model)``: two copies of the same random weights.

    The engine switches its model to paged attention, so references run on the untouched copy.
    """

    def make(arch: str = "llama", seed: int = 0, **overrides):
        model = tiny_model(arch, seed=seed, **overrides)
        return model, copy.deepcopy(model)

    return make


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = True) -> list[int]:
    """transformers' own greedy output for one prompt (float32, no padding)."""
    kwargs = {}
    if ignore_eos:
        kwargs = dict(eos_token_id=None, min_new_tokens=max_new_tokens)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


def first_layer_rows(lean) -> list[int]:
    """Spy on a lean model's :meth:`before_attention`: the list returned gets each forward's first-layer row count
    (the step's tokens, with any padding)."""
    rows = []
    before = lean.before_attention

    def spy(i, h, residual, *args, **kwargs):
        if i == 0:
            rows.append(h.shape[0])
        return before(i, h, residual, *args, **kwargs)

    lean.before_attention = spy
    return rows


def random_prompts(n: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def break_preparation_of(engine, request_id: str) -> None:
    """Make every step that holds ``request_id`` fail in batch preparation (tests of the last line of defence)."""
    build = engine._builder.build

    def fragile(step):
        if any(e.seq.request_id == request_id for e in step.entries):
            raise OverflowError("Python int too large to convert to C long")
        return build(step)

    engine._builder.build = fragile


def encode_spy(tokenizer):
    """``(seen, spy)``: ``spy`` wraps ``tokenizer.encode`` and records, per call, whether it ran on the main thread
    (the event loop's, in these tests)."""
    seen: list[bool] = []
    encode = tokenizer.encode

    def spy(text, *a, **k):
        seen.append(threading.current_thread() is threading.main_thread())
        return encode(text, *a, **k)

    return seen, spy
