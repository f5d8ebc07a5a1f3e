"""The engine on CUDA: greedy output equals model.generate in float32, in both overlap modes (skipped without CUDA)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import first_layer_rows, random_prompts, reference_greedy

from acb import Engine, EngineClosedError, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


PATHS = {
    "graphs": dict(fast_path=True, cuda_graphs=True),
    "mixed": dict(fast_path=True, cuda_graphs=True, mixed_graphs=True),  # prompts' steps in piecewise graphs too
    "lean-eager": dict(fast_path=True, cuda_graphs=False),
    "generic": dict(fast_path=False, cuda_graphs=True),
    "generic-eager": dict(fast_path=False, cuda_graphs=False),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
async def test_greedy_matches_generate_on_cuda(arch, overlap, path, make_model, tokenizer):
    model, ref = make_model(arch, seed=2)
    prompts = random_prompts(10, [5, 17, 33, 64, 3, 100], len(tokenizer), seed=4)
    expected = [reference_greedy(ref, p, 24) for p in prompts]
    config = EngineConfig(
        device="cuda", max_num_batched_tokens=64, block_size=16, num_kv_blocks=30, overlap=overlap, **PATHS[path]
    )
    async with Engine(model, tokenizer, config) as engine:

        async def one(i, p):
            await asyncio.sleep(0.003 * (i % 4))
            return await engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True))

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        stats = engine.stats()
        assert engine.fast_path == (not path.startswith("generic"))
        assert (engine._runner.graphs is not None) == (not path.endswith("eager"))
        assert (engine._runner.mixed is not None) == (path == "mixed")
    assert [o.token_ids for o in outs] == expected
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize("path", ["graphs", "mixed", "generic"])
async def test_a_restart_captures_its_graphs_in_a_worker_thread_and_matches_generate(path, make_model, tokenizer):
    """A closed engine's ``start()`` builds it anew in a worker thread (acb.lifecycle): there the KV cache, the lean
    model's buffers and the decode (and mixed-step) graphs are made and captured on the engine's device; the
    restarted engine's greedy tokens are still ``generate``'s, and a cancelled ``close()`` still gives the model
    back to the next start."""
    model, ref = make_model("llama", seed=2)
    prompts = random_prompts(6, [5, 17, 33, 64], len(tokenizer), seed=4)
    expected = [reference_greedy(ref, p, 16) for p in prompts]
    config = EngineConfig(device="cuda", max_num_batched_tokens=64, block_size=16, num_kv_blocks=30, **PATHS[path])
    engine = Engine(model, tokenizer, config)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for _ in range(2):
        async with engine:
            outs = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
            assert (engine._runner.graphs is not None) and engine.fast_path == (path != "generic")
        assert [o.token_ids for o in outs] == expected
    await engine.start()
    task = asyncio.create_task(engine.generate(prompts[0], SamplingParams(max_new_tokens=200, ignore_eos=True)))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await engine.close()
    assert engine.state == "closed"
    (late,) = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(late, EngineClosedError) or late.finish_reason == "length"
    async with engine:
        outs = await asyncio.gather(*(engine.generate(p, params) for p in prompts))
    assert [o.token_ids for o in outs] == expected


async def test_seeded_sampling_on_cuda_is_batch_independent(make_model, tokenizer):
    model, _ = make_model("llama", seed=3)
    prompts = random_prompts(9, [7, 30, 64], len(tokenizer), seed=5)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    async with Engine(model, tokenizer, EngineConfig(device="cuda", block_size=16)) as engine:
        alone = await engine.generate(prompts[0], params)
        crowd = await asyncio.gather(
            *(
                engine.generate(p, params if i == 0 else SamplingParams(max_new_tokens=30))
                for i, p in enumerate(prompts)
            )
        )
    assert crowd[0].token_ids == alone.token_ids


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_greedy_rows_match_generate_beside_sampled_and_logprob_rows(overlap, make_model, tokenizer):
    """Decode graphs sample all-greedy steps inside the graph and other steps outside it: greedy requests get the
    same tokens either way, also while the batch turns from mixed to all-greedy as the sampled requests end."""
    model, ref = make_model("llama", seed=6)
    prompts = random_prompts(9, [9, 40, 21], len(tokenizer), seed=7)
    expected = {i: reference_greedy(ref, p, 20) for i, p in enumerate(prompts) if i % 3 != 1}

    def params(i: int) -> SamplingParams:
        if i % 3 == 1:
            return SamplingParams(max_new_tokens=6, temperature=0.8, seed=i, ignore_eos=True)
        return SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=i % 3 == 2)

    config = EngineConfig(device="cuda", block_size=16, overlap=overlap)
    async with Engine(model, tokenizer, config) as engine:
        outs = await asyncio.gather(*(engine.generate(p, params(i)) for i, p in enumerate(prompts)))
        assert engine._runner.graphs is not None
    assert {i: outs[i].token_ids for i in expected} == expected
    assert all(len(outs[i].logprobs) == 20 for i in expected if i % 3 == 2)


@pytest.mark.parametrize("path", ["graphs", "lean-eager", "generic"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_multi_step_rounds_match_single_steps_on_cuda(overlap, path, make_model, tokenizer):
    """decode_steps=4: rounds of graph replays (or eager steps) fed from the device token buffer give the tokens of
    single steps, for greedy, seeded, logprob and stop-token rows, with preemption."""
    model, ref = make_model("qwen2", seed=8)
    prompts = random_prompts(10, [5, 17, 33, 64, 3, 100], len(tokenizer), seed=8)
    expected = [reference_greedy(ref, p, 23) for p in prompts]

    def params(i: int) -> SamplingParams:
        if i == 1:
            return SamplingParams(max_new_tokens=23, temperature=0.8, seed=3, ignore_eos=True)
        if i == 2:
            return SamplingParams(max_new_tokens=23, ignore_eos=True, stop_token_ids=[expected[2][9]])
        return SamplingParams(max_new_tokens=23, ignore_eos=True, logprobs=i == 3)

    async def run(steps: int, m):
        config = EngineConfig(
            device="cuda", block_size=16, num_kv_blocks=30, max_num_batched_tokens=64, overlap=overlap,
            decode_steps=steps, **PATHS[path],
        )  # fmt: skip
        async with Engine(m, tokenizer, config) as engine:

            async def one(i, p):
                await asyncio.sleep(0.003 * (i % 4))
                return await engine.generate(p, params(i))

            outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        return outs

    import copy

    single = await run(1, copy.deepcopy(model))
    rounds = await run(4, model)
    assert [o.token_ids for o in rounds] == [o.token_ids for o in single]
    greedy = [i for i in range(len(prompts)) if i not in (1, 2)]
    assert [rounds[i].token_ids for i in greedy] == [expected[i] for i in greedy]
    assert rounds[2].finish_reason == "stop" and rounds[2].token_ids == expected[2][:10]
    assert rounds[3].logprobs == pytest.approx(single[3].logprobs, abs=1e-4)


@pytest.mark.parametrize("path", ["graphs", "generic"])
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
async def test_prefix_caching_on_cuda_gives_the_tokens_of_no_caching(overlap, path, make_model, tokenizer):
    """Shared system prompts, multi-turn extensions and exact repeats: prefills that start after a cached prefix
    (the paged prefill kernel reading context it did not write) give the same greedy tokens as full prefills."""
    import random

    model, ref = make_model("llama", seed=9)
    rng = random.Random(9)
    system = [rng.randrange(3, len(tokenizer)) for _ in range(70)]
    prompts = [system + [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 30))] for _ in range(8)]
    prompts += [prompts[0] + [5, 6, 7] * 5, list(prompts[1]), system[:64]]
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    config = EngineConfig(device="cuda", block_size=16, max_num_batched_tokens=64, overlap=overlap, **PATHS[path])
    async with Engine(model, tokenizer, config) as engine:
        first = await engine.generate(prompts[0], SamplingParams(max_new_tokens=12, ignore_eos=True))
        outs = await asyncio.gather(
            *(engine.generate(p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for p in prompts[1:])
        )
        stats = engine.stats()
    assert [first.token_ids] + [o.token_ids for o in outs] == expected
    assert stats.prefix_hits >= 8 and stats.kv_blocks_free == stats.kv_blocks_total


async def test_step_timing_records_every_steps_interval_and_shape(make_model, tokenizer):
    """What the benchmarks' GPU idle and GPU time per kind of step read: one interval per (sub-)step, each with its
    rows, tokens and whether it replayed a decode graph; clearing forgets both."""
    model, _ = make_model("llama", seed=2)
    prompts = random_prompts(6, [5, 40], len(tokenizer), seed=3)
    config = EngineConfig(device="cuda", block_size=16, record_step_timing=True, warmup=False, decode_steps=2)
    async with Engine(model, tokenizer, config) as engine:
        await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=9, ignore_eos=True)) for p in prompts))
        intervals, shapes = engine.step_intervals(), engine.step_shapes()
        assert len(intervals) == len(shapes) >= 9
        assert all(0 <= s <= e for s, e in intervals)
        assert shapes[0][1] > shapes[0][0] and not shapes[0][2]  # the first step starts prompts: eager
        assert any(graphed and tokens == rows for rows, tokens, graphed in shapes)  # decode rounds replayed graphs
        engine.clear_step_timing()
        assert engine.step_intervals() == [] and engine.step_shapes() == []


async def test_eager_steps_are_padded_and_their_gemms_warmed_on_cuda(make_model, tokenizer):
    """On CUDA the lean path's eager steps pad their tokens (to 16; to whole 128-row tiles past 8,192 tokens) and the
    warm-up runs every such row count first. A 9,000-token first step (five 1,800-token prompts) runs 9,088 rows, a
    later one of 35 tokens 48, and the tokens equal ``generate``'s (float32)."""
    model, ref = make_model("llama", seed=6)
    prompts = random_prompts(6, [1800, 1800, 1800, 1800, 1800, 35], len(tokenizer), seed=6)
    expected = [reference_greedy(ref, p, 4) for p in prompts]
    config = EngineConfig(device="cuda", max_num_batched_tokens=9000, block_size=16, warmup=True)
    async with Engine(model, tokenizer, config) as engine:
        assert engine.startup["warmup_gemms_s"] > 0 and engine._runner.token_multiple == 16
        rows = first_layer_rows(engine._runner.lean)
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        first = await asyncio.gather(*(engine.generate(p, params) for p in prompts[:5]))
        last = await engine.generate(prompts[5], params)
    assert [o.token_ids for o in first] + [last.token_ids] == expected
    assert 9088 in rows and 48 in rows


SPLIT_SHAPES = {  # tiny models whose output and down projections the split-K kernel takes (K a multiple of 256)
    "llama": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2),
    "gemma3": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, query_pre_attn_scalar=64),
}  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")  # fmt: skip
@pytest.mark.parametrize("path", ["graphs", "mixed", "lean-eager"])
@pytest.mark.parametrize("arch", list(SPLIT_SHAPES))
async def test_split_projections_keep_the_greedy_tokens_on_hopper(arch, path, monkeypatch, tokenizer):
    """bf16 models whose output and down projections run as split-K partial sums (acb.kernels.projection), summed
    by the norms after them: the engine gives the tokens of the same engine with cuBLAS
    (``ACB_SPLIT_PROJECTIONS=0``), where a sequence may part only at a near-tie of the float32 reference (the two
    sum their float32 products in different orders before rounding to bf16). The first prompt is longer than a
    step's budget: the first step is a chunk of it alone, which samples no row (no projection runs past its last
    attention)."""
    import copy

    from acb.default_model import tiny_model

    ref = tiny_model(arch, seed=11, **SPLIT_SHAPES[arch]).cuda()
    prompts = random_prompts(12, [150, 5, 17, 33, 64, 3], len(tokenizer), seed=7)
    config = EngineConfig(device="cuda", max_num_batched_tokens=64, block_size=16, **PATHS[path])

    async def run(split: bool):
        monkeypatch.setenv("ACB_SPLIT_PROJECTIONS", "1" if split else "0")
        model = copy.deepcopy(ref).to(torch.bfloat16)
        async with Engine(model, tokenizer, config) as engine:
            outs = await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True))
                                          for p in prompts))  # fmt: skip
            reason = engine.path_reason
        return [o.token_ids for o in outs], reason

    (split, reason_on), (plain, reason_off) = await run(True), await run(False)
    assert "up to 64 rows: split-K kernel" in reason_on, reason_on
    assert "cuBLAS (ACB_SPLIT_PROJECTIONS=0)" in reason_off, reason_off
    same = 0
    for p, a, b in zip(prompts, split, plain):
        j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            same += 1
            continue
        with torch.no_grad():
            logits = ref(torch.tensor([p + a[:j]], device="cuda")).logits[0, -1].float()
        gap = (logits[a[j]] - logits[b[j]]).abs().item()
        assert gap < 0.05 * (logits.max() - logits.mean()).item(), (j, gap)  # a near-tie, not an error
    assert same >= len(prompts) // 2
