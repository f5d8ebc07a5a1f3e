"""Tensor parallelism on the CPU: two processes over gloo give ``tensor_parallel_size=1``'s and ``model.generate``'s
greedy tokens (float32), with preemption, multi-step rounds and cancellation; a worker that dies fails the engine
with a clear error; closing the engine leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from conftest import random_prompts, reference_greedy

from acb import Engine, EngineClosedError, EngineConfig, RequestFailedError, SamplingParams
from acb.default_model import tiny_model

pytestmark = pytest.mark.loops("asyncio")


def _gone(pids: list[int]) -> bool:
    """No process with these ids is left (joined: not even a zombie)."""
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


async def _run(engine: Engine, prompts, n: int):
    async def one(i, p):
        await asyncio.sleep(0.002 * i)
        return await engine.generate(p, SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=i == 1))

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


@pytest.mark.parametrize(
    "arch, overlap, steps",
    [("llama", True, 1), ("llama", False, 4), ("qwen2", True, 4), ("qwen3", False, 1), ("gemma3", True, 1)],
)
async def test_two_ranks_give_one_ranks_tokens_and_generates(arch, overlap, steps, make_model, tokenizer):
    model, ref = make_model(arch, seed=5)
    prompts = random_prompts(8, [5, 17, 33, 3, 40, 12], len(tokenizer), seed=5)
    expected = [reference_greedy(ref, p, 16) for p in prompts]
    # 14 blocks of 8 tokens for 8 prompts of up to 56 tokens: sequences are preempted and resumed
    config = dict(block_size=8, num_kv_blocks=14, max_num_batched_tokens=32, overlap=overlap, decode_steps=steps,
                  fast_path=True)  # fmt: skip
    async with Engine(ref, tokenizer, EngineConfig(**config)) as one_rank:
        single = await _run(one_rank, prompts, 16)
    async with Engine(model, tokenizer, EngineConfig(tensor_parallel_size=2, **config)) as engine:
        outs = await _run(engine, prompts, 16)
        stats = engine.stats()
        workers = engine._runner.tp.alive()
        assert len(workers) == 1 and "tensor parallel over 2 processes" in engine.path_reason
    assert [o.token_ids for o in outs] == expected == [o.token_ids for o in single]
    assert outs[1].logprobs == pytest.approx(single[1].logprobs, abs=1e-4)
    assert stats.num_preemptions > 0 and stats.kv_blocks_free == stats.kv_blocks_total
    assert _gone(workers)


async def test_cancelled_requests_free_their_blocks_on_every_rank(make_model, tokenizer):
    model, ref = make_model("llama", seed=6)
    prompts = random_prompts(4, [9, 30], len(tokenizer), seed=6)
    config = EngineConfig(block_size=8, tensor_parallel_size=2, fast_path=True)
    async with Engine(model, tokenizer, config) as engine:
        for i, p in enumerate(prompts[:3]):  # left early: the stream's end aborts the request
            k = 0
            async for _ in engine.stream(p, SamplingParams(max_new_tokens=200, ignore_eos=True)):
                k += 1
                if k >= 3 * i:
                    break
        task = asyncio.create_task(engine.generate(prompts[3], SamplingParams(max_new_tokens=500, ignore_eos=True)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        after = await engine.generate(prompts[0], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert after.token_ids == reference_greedy(ref, prompts[0], 10)  # the ranks' caches still agree


async def test_a_dead_worker_fails_every_request_and_the_engine(make_model, tokenizer):
    model, _ = make_model("llama", seed=7)
    prompts = random_prompts(4, [9, 30], len(tokenizer), seed=7)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, tensor_parallel_size=2, fast_path=True))
    async with engine:
        tasks = [asyncio.create_task(engine.generate(p, SamplingParams(max_new_tokens=2000, ignore_eos=True)))
                 for p in prompts]  # fmt: skip
        await asyncio.sleep(0.2)
        workers = engine._runner.tp.alive()
        os.kill(workers[0], signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert all(isinstance(r, RequestFailedError) for r in results), results
        assert all("tensor-parallel" in str(r) for r in results), results
        assert engine.state == "failed"
        with pytest.raises(EngineClosedError):  # a failed engine takes no request
            await engine.generate(prompts[0], SamplingParams(max_new_tokens=2))
    assert engine.state == "closed" and _gone(workers)


def test_closing_without_a_request_and_dropping_the_engine_leave_no_process(tokenizer):
    async def main():
        engine = Engine(tiny_model("llama", seed=1), tokenizer, EngineConfig(tensor_parallel_size=2, fast_path=True))
        workers = engine._runner.tp.alive()
        await engine.close()  # never started
        return workers

    assert _gone(asyncio.run(main()))

    import gc

    engine = Engine(tiny_model("llama", seed=1), tokenizer, EngineConfig(tensor_parallel_size=2, fast_path=True))
    workers = engine._runner.tp.alive()
    assert len(workers) == 1
    del engine  # never closed: collecting it ends its workers
    gc.collect()
    assert _gone(workers)


@pytest.mark.parametrize(
    "arch, overrides, match",
    [
        ("llama", dict(tensor_parallel_size=3), "does not divide the model's 4 attention heads"),
        ("llama", dict(tensor_parallel_size=2, fast_path=False), "fast_path=False"),
        ("mixtral", dict(tensor_parallel_size=2), "needs the lean path"),
    ],
)
def test_what_cannot_be_split_is_refused_before_any_process_starts(arch, overrides, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        Engine(tiny_model(arch), tokenizer, EngineConfig(**overrides))


@pytest.mark.parametrize("bad", [0, -1, 2.0, "2", True, 65])
def test_tensor_parallel_size_is_checked(bad):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=bad)


def test_a_worker_that_cannot_start_is_reported_at_once():
    """A worker that dies while starting (here: told to use CUDA on a machine without it) ends the start with
    WorkerFailedError naming its exit, instead of leaving rank 0 waiting for it to join."""
    import dataclasses
    import time

    import torch

    from acb.errors import WorkerFailedError
    from acb.families import adapter, lean_plan
    from acb.kv_cache import ModelShape
    from acb.parallel import TensorParallel, shard_spec
    from acb.parallel.workers import Geometry

    model = tiny_model("llama")
    family, _ = lean_plan(model)
    spec = adapter(family).lean_spec(model)
    shards = [shard_spec(spec, r, 2, 64) for r in range(2)]
    shape = dataclasses.replace(ModelShape.from_config(model.config), num_kv_heads=1)
    geo = Geometry(family=family, vocab_size=shape.vocab_size, shape=shape, dtype=torch.float32, num_blocks=9,
                   block_size=8, max_tokens=32, max_rows=4, max_blocks=8, max_positions=64, device_type="cuda",
                   device_index=0, graph_rows=0, threads=1)  # fmt: skip
    tp = TensorParallel(2, torch.device("cpu"))
    t0 = time.monotonic()
    with pytest.raises(WorkerFailedError, match="exited with code"):
        tp.start(shards, geo)
    assert time.monotonic() - t0 < 60 and tp.alive() == []


async def test_a_forward_that_fails_on_rank_0_stops_the_workers_instead_of_hanging(make_model, tokenizer):
    """After rank 0 sent a step, its own forward raising would leave the workers inside a collective: the engine
    ends them and fails (promptly, not after the collective timeout)."""
    model, _ = make_model("llama", seed=8)
    prompts = random_prompts(2, [9, 20], len(tokenizer), seed=8)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, tensor_parallel_size=2, fast_path=True))
    async with engine:
        await engine.generate(prompts[0], SamplingParams(max_new_tokens=2, ignore_eos=True))
        lean = engine._runner.lean
        norm = lean._norm

        def failing(x, residual, w):
            if w is lean.layers[1].ln1:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return norm(x, residual, w)

        lean._norm = failing
        workers = engine._runner.tp.alive()
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=4)) for p in prompts),
                           return_exceptions=True), 30)  # fmt: skip
        assert all(isinstance(r, RequestFailedError) and "tensor-parallel forward failed" in str(r)
                   for r in results), results  # fmt: skip
        assert engine.state == "failed"
    assert _gone(workers)


def test_workers_end_when_rank_0_is_killed(tmp_path):
    """A worker notices that its rank 0 is gone (SIGKILL: no cleanup ran) while it waits for the next header."""
    import subprocess
    import sys
    import time

    script = tmp_path / "rank0.py"
    script.write_text(
        "import os, sys, time\n"
        "from acb import Engine, EngineConfig\n"
        "from acb.default_model import default_tokenizer, tiny_model\n"
        "if __name__ == '__main__':\n"
        "    engine = Engine(tiny_model('llama'), default_tokenizer(), EngineConfig(tensor_parallel_size=2))\n"
        "    print(*engine._runner.tp.alive(), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 1
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while not _gone(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(workers)


def test_a_meta_shard_becomes_random_weights_on_its_rank_and_real_ones_are_copied():
    """A model built on the meta device (a shape with no weights) shards into meta tensors; each rank makes its own
    random weights (norms ones, biases zeros, the rest small and seeded), while real weights travel unchanged."""
    import torch
    from transformers import AutoModelForCausalLM

    from acb.default_model import tiny_config
    from acb.families import adapter
    from acb.parallel.shard import materialize, shard_spec

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    shard = shard_spec(adapter("llama").lean_spec(meta), 1, 2, 64)
    assert shard.layers[0].qkv_w.device.type == "meta"
    cpu = torch.device("cpu")
    a, b, c = materialize(shard, cpu, seed=1), materialize(shard, cpu, seed=1), materialize(shard, cpu, seed=2)
    lw = a.layers[0]
    assert lw.qkv_w.shape == shard.layers[0].qkv_w.shape and lw.qkv_w.device == cpu
    assert torch.equal(lw.ln1, torch.ones_like(lw.ln1)) and torch.equal(a.norm, torch.ones_like(a.norm))
    assert torch.equal(lw.qkv_b, torch.zeros_like(lw.qkv_b))
    assert 0.015 < lw.gate_up_w.float().std().item() < 0.025
    assert torch.equal(lw.down_w, b.layers[0].down_w) and not torch.equal(lw.down_w, c.layers[0].down_w)
    # the rotary tables of a meta model are computed on the CPU, equal to a real model's
    real = tiny_model("qwen2")
    want = shard_spec(adapter("llama").lean_spec(real), 1, 2, 64).rotary[0]
    assert torch.equal(a.rotary[0].cos, want.cos) and torch.equal(a.rotary[0].sin, want.sin)
    kept = materialize(shard_spec(adapter("llama").lean_spec(real), 0, 2, 64), cpu)
    assert torch.equal(
        kept.layers[1].o_w, real.model.layers[1].self_attn.o_proj.weight[:, : kept.layers[1].o_w.shape[1]]
    )


async def test_a_meta_model_serves_with_random_weights_on_every_rank(tokenizer):
    """A 70B-style start: no rank ever holds the whole model; the engine serves (random weights, seeded per rank),
    and two engines on the same shape give the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from acb.default_model import tiny_config

    prompts = random_prompts(3, [7, 19, 4], len(tokenizer), seed=9)
    runs = []
    for _ in range(2):
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
        async with Engine(meta, tokenizer, EngineConfig(block_size=8, tensor_parallel_size=2)) as engine:
            assert engine.fast_path
            outs = await _run(engine, prompts, 6)
        runs.append([o.token_ids for o in outs])
    assert runs[0] == runs[1] and all(len(t) == 6 for t in runs[0])


_ONE_SHOT = """
import torch
from acb.kernels.one_shot import one_shot, one_shot_gather, one_shot_push, one_shot_push_norm

W, n, BLOCK, words = 2, 3000, 1024, 128  # 3 programs; 64 programs x 2 ranks of flags
P, slot = 3, n * 4
for kernel, parts in ((one_shot, 1), (one_shot_push, W)):
    bufs = [torch.zeros(words + 2 * parts * slot // 8, dtype=torch.int64) for _ in range(W)]
    abort = torch.zeros(1, dtype=torch.int32)
    bases = torch.tensor([b.data_ptr() for b in bufs] + [abort.data_ptr()], dtype=torch.int64)
    counters = [torch.zeros(64, dtype=torch.int64) for _ in range(W)]
    for epoch in (1, 2, 3):
        xs = [torch.randn(n) for _ in range(W)]
        # rank 0 has written its input and signalled rank 1 (a second process on a GPU): rank 1 goes first
        region = words + (epoch % 2) * parts * slot // 8
        for b in bufs if parts > 1 else bufs[:1]:  # pull: rank 0's own slot; push: rank 0's part in every buffer
            b[region:].view(torch.float32)[:n] = xs[0]
        bufs[1][:words].view(64, W)[:P, 0] = epoch
        got = [xs[0].clone(), xs[1].clone()]
        for rank in (1, 0):
            kernel[(P,)](got[rank], n, bases, counters[rank], words * 8, slot, RANK=rank, WORLD=W, BLOCK=BLOCK,
                         SPIN=100)
        assert torch.equal(got[0], xs[0] + xs[1]) and torch.equal(got[1], xs[0] + xs[1]), kernel
        assert counters[0][:P].tolist() == counters[1][:P].tolist() == [epoch] * P
        assert bufs[0][:words].view(64, W)[:P, 1].tolist() == [epoch] * P  # rank 1's signal reached rank 0
    # rank 0 is gone: rank 1's next call waits for a signal that never comes, until the abort word is set
    abort[0] = 1
    kernel[(P,)](xs[1].clone(), n, bases, counters[1], words * 8, slot, RANK=1, WORLD=W, BLOCK=BLOCK, SPIN=2**31 - 1)

# the push sum fused with the residual add and RMSNorm: rows of 500 (a padded block), two rows per program
rows, cols = 2 * P, n // (2 * P)
bufs = [torch.zeros(words + 2 * W * slot // 8, dtype=torch.int64) for _ in range(W)]
abort = torch.zeros(1, dtype=torch.int32)
bases = torch.tensor([b.data_ptr() for b in bufs] + [abort.data_ptr()], dtype=torch.int64)
counters = [torch.zeros(64, dtype=torch.int64) for _ in range(W)]
g = 1 + 0.1 * torch.randn(cols)
for epoch in (1, 2, 3):
    xs = [torch.randn(rows, cols) for _ in range(W)]
    res = torch.randn(rows, cols)
    region = words + (epoch % 2) * W * slot // 8
    for b in bufs:
        b[region:].view(torch.float32)[:n] = xs[0].flatten()
    bufs[1][:words].view(64, W)[:P, 0] = epoch
    outs, resids = [None, None], [res.clone(), res.clone()]
    for rank in (1, 0):
        x = xs[rank].clone()
        outs[rank] = torch.empty_like(x)
        one_shot_push_norm[(P,)](x, resids[rank], g, outs[rank], rows, cols, 1e-6, bases, counters[rank], words * 8,
                                 slot, RANK=rank, WORLD=W, BLOCK=512, SPIN=100)
        assert torch.equal(x, xs[rank])  # the input is left as it was
    s = res + xs[0] + xs[1]
    want = s * torch.rsqrt(s.pow(2).mean(1, keepdim=True) + 1e-6) * g
    for rank in (0, 1):
        assert torch.allclose(resids[rank], s, atol=1e-6) and torch.allclose(outs[rank], want, atol=1e-5), rank
    assert torch.equal(outs[0], outs[1]) and counters[0][:P].tolist() == [epoch] * P

# the gather: rows of 7 side by side (a chunk of a program spans rows), into fresh buffers and flags
rows, cols = 3, 7
bufs = [torch.zeros(words + 2 * W * slot // 8, dtype=torch.int64) for _ in range(W)]
bases = torch.tensor([b.data_ptr() for b in bufs] + [abort.data_ptr()], dtype=torch.int64)
counters = [torch.zeros(64, dtype=torch.int64) for _ in range(W)]
for epoch in (1, 2, 3):
    xs = [torch.randn(rows, cols) for _ in range(W)]
    region = words + (epoch % 2) * W * slot // 8
    part0 = bufs[1][region:].view(torch.float32)[: rows * cols]  # rank 0's part in rank 1's buffer
    part0.copy_(xs[0].flatten())  # rank 0 pushed it and signalled (rank 1 goes first)
    bufs[1][:words].view(64, W)[:P, 0] = epoch
    outs = [torch.full((rows, W * cols), float("nan")) for _ in range(W)]
    one_shot_gather[(P,)](xs[1], outs[1], rows * cols, cols, bases, counters[1], words * 8, slot, RANK=1, WORLD=W,
                          BLOCK=8, SPIN=100)
    assert bufs[0][:words].view(64, W)[:P, 1].tolist() == [epoch] * P  # rank 1 signalled rank 0
    part0.fill_(float("nan"))
    one_shot_gather[(P,)](xs[0], outs[0], rows * cols, cols, bases, counters[0], words * 8, slot, RANK=0, WORLD=W,
                          BLOCK=8, SPIN=100)
    assert torch.equal(part0, xs[0].flatten())  # rank 0 pushed its part into rank 1's buffer
    assert torch.equal(outs[0], torch.cat(xs, 1)) and torch.equal(outs[1], torch.cat(xs, 1)), epoch
    assert counters[0][:P].tolist() == counters[1][:P].tolist() == [epoch] * P
# rank 1's signal never comes: rank 0 waits until the abort word is set
bufs[0][:words].zero_()
abort[0] = 1
one_shot_gather[(P,)](xs[0], outs[0], rows * cols, cols, bases, counters[0], words * 8, slot, RANK=0, WORLD=W,
                      BLOCK=8, SPIN=2**31 - 1)
print("ok")
"""


def test_the_one_shot_all_reduce_kernel_sums_and_signals():
    """The one-shot all-reduce's kernels (pull and push) under Triton's interpreter, two ranks played in turn in one
    process: each sums both ranks' inputs, signals its peer, and advances its epoch; three calls alternate the
    regions; a wait for a peer that never signals ends once the abort word is set. The push sum fused with the
    residual add and RMSNorm gives both ranks the same normed rows and residual; the gather puts both ranks' rows
    side by side on both."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _ONE_SHOT], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_closing_a_group_does_not_wait_on_a_communicator_that_will_not_abort(monkeypatch):
    """On four H200s, aborting NCCL communicators after a run with collectives in CUDA graphs did not return:
    closing gives the abort its own thread and a bounded wait, then goes on."""
    import threading
    import time

    import torch

    from acb.parallel import group as group_module

    entered, release = threading.Event(), threading.Event()

    class Stuck:
        def abort(self):
            entered.set()
            release.wait(30)

    g = group_module.Group.__new__(group_module.Group)
    g.device, g._pg, g._graph_pg, g.one_shot = torch.device("cuda", 0), Stuck(), Stuck(), None
    monkeypatch.setattr(group_module, "CLOSE_WAIT_S", 0.2)
    t0 = time.monotonic()
    g.close(settled=False)
    assert time.monotonic() - t0 < 2 and entered.is_set()
    release.set()


async def test_each_rank_reads_its_shard_from_the_checkpoint(tmp_path, tokenizer):
    """``Engine.from_pretrained(dir, tensor_parallel_size=2)`` on a safetensors directory: the engine's model stays
    on the meta device (no process holds the whole model); each rank reads its shard from the files, a layer at a
    time; greedy equals the saved model's ``generate``."""

    model = tiny_model("qwen2", seed=11)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    prompts = random_prompts(4, [7, 30, 12], len(tokenizer), seed=11)
    expected = [reference_greedy(model, p, 10) for p in prompts]
    engine = Engine.from_pretrained(str(tmp_path), device="cpu", tensor_parallel_size=2, fast_path=True, block_size=8)
    assert all(p.device.type == "meta" for p in engine.model.parameters())
    async with engine:
        outs = await _run(engine, prompts, 10)
    assert [o.token_ids for o in outs] == expected


def test_a_shard_read_from_files_equals_the_shard_of_the_loaded_model(tmp_path):
    """Every lean family: the per-rank reader gives, tensor for tensor, the shard that sharding the whole loaded model
    gives."""
    import copy

    import torch

    from acb.families import adapter, lean_plan
    from acb.parallel.checkpoint import read_shard
    from acb.parallel.shard import shard_spec

    for arch in ("llama", "qwen3", "gemma3", "phi3"):
        model = tiny_model(arch, seed=3)
        path = tmp_path / arch
        model.save_pretrained(path, safe_serialization=True)
        family, _ = lean_plan(model)
        whole = adapter(family).lean_spec(copy.deepcopy(model))
        for rank in range(2):
            want, got = shard_spec(whole, rank, 2, 64), read_shard(str(path), model.config, torch.float32, family,
                                                                   rank, 2, 64)  # fmt: skip
            for a, b in zip(want.layers, got.layers):
                for f in ("qkv_w", "o_w", "gate_up_w", "down_w", "ln1", "ln2", "q_norm", "k_norm"):
                    x, y = getattr(a, f), getattr(b, f)
                    assert (x is None and y is None) or torch.equal(x, y), (arch, rank, f)
            assert torch.equal(want.embed, got.embed) and torch.equal(want.lm_head, got.lm_head), arch
            assert torch.equal(want.rotary[0].cos, got.rotary[0].cos) and want.embed_scale == got.embed_scale


def test_closing_after_a_lost_peer_leaves_the_graphs_alone():
    """A dead tensor-parallel peer may leave the GPU inside a collective forever: closing must not release (or drop,
    whose destructor waits just the same) the CUDA graphs; with healthy peers it releases them first."""
    from types import SimpleNamespace

    from acb import runner

    def fake(failed):
        released, stopped = [], []
        graphs = SimpleNamespace(release=lambda: released.append("graphs"))
        r = SimpleNamespace(
            _worker=SimpleNamespace(shutdown=lambda timeout: True), graphs=graphs, mixed=None,
            tp=SimpleNamespace(failed=failed, stop=lambda: stopped.append(True)), lean=None, kv_cache=None,
            generic=None, closed=False,
        )  # fmt: skip
        return r, graphs, released, stopped

    r, graphs, released, stopped = fake("tensor-parallel worker 1 exited with code -9")
    assert runner.ModelRunner.close(r, timeout=0) is True
    assert released == [] and stopped == [True] and r.graphs is None and graphs in runner._ABANDONED
    runner._ABANDONED.remove(graphs)
    r, graphs, released, stopped = fake(None)
    runner.ModelRunner.close(r, timeout=0)
    assert released == ["graphs"] and stopped == [True] and graphs not in runner._ABANDONED
