"""The CPU side of the benchmark harness: workloads, metrics, the table, tracing and the timeline picture.

No test asserts a speed."""

from __future__ import annotations

import json
import statistics

import pytest

from acb import Engine, EngineConfig, SamplingParams
from acb.tracing import LANES
from bench.metrics import decode_floor, decode_floor_seconds, idle_fraction, percentile, step_kinds
from bench.workloads import WORKLOADS, make_requests


def test_workloads_match_the_spec():
    assert (WORKLOADS["W-side"].requests, WORKLOADS["W-side"].prompt, WORKLOADS["W-side"].new) == (32, 256, 1024)
    side = make_requests(WORKLOADS["W-side"], vocab=1000, seed=0)
    assert len(side) == 32 and all(len(p) == 256 and n == 1024 for p, n in side)
    assert side == make_requests(WORKLOADS["W-side"], vocab=1000, seed=0)  # reproducible
    share = make_requests(WORKLOADS["W-share"], vocab=1000, seed=0)
    lens = [len(p) for p, _ in share] + [n for _, n in share]
    assert len(share) == 1000 and min(lens) >= 8 and max(lens) <= 2048
    assert 100 <= statistics.median(lens) <= 160  # lognormal, median 128
    quick = WORKLOADS["W-side"].scaled(0.25)
    assert quick.new == 256 and quick.prompt == 256 and "scaled" in quick.note


def test_metrics():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert idle_fraction([(0, 1), (2, 3)]) == pytest.approx(1 / 3)
    assert idle_fraction([(0, 2), (1, 3), (3, 4)]) == 0.0  # overlapping and touching steps: never idle
    # 10 bytes of weights, 1 byte of KV per token, 12 bytes/s. Step 0: both sequences at context 1 -> 12 bytes;
    # step 1: only the first (context 2) -> 12 bytes. Two seconds.
    assert decode_floor_seconds(10, 1, [(1, 2), (1, 1)], 12.0, 8) == pytest.approx(2.0)
    # one slot: the second request starts when the first ends (steps read 10+1, 10+2, then 10+5 bytes at 1 B/s)
    assert decode_floor_seconds(10, 1, [(1, 2), (5, 1)], 1.0, 1) == pytest.approx(38.0)
    assert decode_floor(10, 1, [(1, 2), (5, 1)], 1.0, 1) == (pytest.approx(38.0), 3)


def test_step_kinds_split_gpu_time_by_kind_of_step():
    intervals = [(0.0, 5.0), (5.0, 10.0), (10.0, 160.0), (160.0, 171.0), (171.0, 215.0)]
    shapes = [(8, 8, True), (30, 30, True), (40, 8192, False), (200, 200, True), (700, 700, False)]
    kinds = step_kinds(intervals, shapes)
    assert list(kinds) == [  # largest GPU time first
        "with prompts, > 4096 tokens", "decode eager, <= 1024 rows", "decode graph, <= 256 rows",
        "decode graph, <= 32 rows",
    ]  # fmt: skip
    assert kinds["decode graph, <= 32 rows"] == {"steps": 2, "gpu_s": 0.01, "tokens": 38, "mean_ms": 5.0}
    assert kinds["with prompts, > 4096 tokens"]["mean_ms"] == 150.0
    with pytest.raises(ValueError):  # a shape for every interval, or the split is wrong
        step_kinds(intervals, shapes[:-1])


_SKINNY = """
import torch
from bench.skinny import LINEAR_ROWS, _tickets, skinny_linear
torch.manual_seed(0)
configs = [None, (64, 64, 1, 4, 2, False), (32, 32, 3, 4, 2, True), (64, 32, 4, 4, 2, False)]
for dtype in (torch.float32, torch.float16):  # the interpreter's tl.dot mishandles bf16; the card checks bf16 itself
    for m, n, k in [(1, 96, 256), (5, 130, 300), (33, 64, 520), (100, 200, 128), (LINEAR_ROWS, 64, 1000)]:
        x = torch.randn(m, k, dtype=dtype)
        w = (torch.randn(n, k) * 0.05).to(dtype)
        b = torch.randn(n, dtype=dtype)
        ref = x.float() @ w.float().t() + b.float()
        for config in configs:
            got = skinny_linear(x, w, b, config).float()
            assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3, (dtype, m, n, k, config)
assert not _tickets(torch.device("cpu")).any()  # every call's last programs handed their tickets back
try:
    skinny_linear(torch.zeros(LINEAR_ROWS + 1, 8), torch.zeros(8, 8))
except ValueError:
    print("ok")
"""


def test_the_candidate_skinny_gemm_computes_x_times_w_transposed():
    """bench/skinny.py's split-K kernel (a candidate measured against cuBLAS on the card), under Triton's interpreter:
    splits of K whose last program sums the partials, swapped operands, a bias, rows that do not fill a block, N and K
    that do not divide by the tiles."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _SKINNY], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


_CHAIN = """
import torch
from bench.chain import EPS, Dense, chain
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):  # the interpreter's tl.dot mishandles bf16
    for cfg in [(32, 64, 1, 4, 2), (32, 32, 2, 4, 2), (16, 32, 4, 4, 2)]:
        for m in (3, 16):
            n, k = 48, 128
            w = torch.randn(2 * n, k, dtype=dtype) / k**0.5
            x, r = torch.randn(m, k, dtype=dtype), torch.randn(m, k, dtype=dtype)
            g = (1 + 0.1 * torch.randn(k)).to(dtype)
            y = torch.empty(m, n, dtype=dtype)
            d = Dense(w[:n].contiguous(), m, cfg)
            got, ref = d(x, y).float(), x.float() @ w[:n].float().t()
            assert (got - ref).abs().max() < 1e-2 * ref.abs().max(), ("plain", cfg, m, dtype)
            assert torch.equal(d(x, y.clone()).float(), got)  # split-K: the counters were reset, the same bits
            rout = torch.empty_like(r)
            got = d(x, y, norm=g, residual=r, residual_out=rout).float()
            s = x.float() + r.float()
            ref = ((s * torch.rsqrt(s.pow(2).mean(1, keepdim=True) + EPS)).to(dtype) * g).float() @ w[:n].float().t()
            assert torch.equal(rout, s.to(dtype)) and (got - ref).abs().max() < 1e-2 * ref.abs().max(), ("norm", cfg)
            got = Dense(w, m, cfg, gated=True)(x, y).float()
            gu = x.float() @ w.float().t()
            ref = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
            assert (got - ref).abs().max() < 2e-2 * ref.abs().max(), ("gated", cfg, m, dtype)
# the chain: every variant without PDL (the interpreter has no grid dependency control) computes the same layers
hidden, inter, qkv_n, q_cols, rows = 64, 128, 96, 64, 4
layers = [{"qkv": torch.randn(qkv_n, hidden) / 8, "o": torch.randn(hidden, q_cols) / 8,
           "gate_up": torch.randn(2 * inter, hidden) / 8, "down": torch.randn(hidden, inter) / 10} for _ in range(3)]
gammas = [1 + 0.1 * torch.randn(hidden) for _ in range(2)]
ops = [{name: Dense(lw[name], rows, (16, 32, 2, 4, 2)) for name in lw} for lw in layers]
fused = [dict(o, gate_up=Dense(lw["gate_up"], rows, (16, 32, 2, 4, 2), gated=True)) for o, lw in zip(ops, layers)]
start, outs = torch.randn(rows, hidden), {}
for variant, vops in (("cublas", None), ("triton", ops), ("fused", fused)):
    z = lambda n: torch.zeros(rows, n)
    bufs = {"h": start.clone(), "res": z(hidden), "res2": z(hidden), "normed": z(hidden), "qkv": z(qkv_n),
            "gu": z(2 * inter), "act": z(inter), "h2": z(hidden), "q_cols": q_cols}
    outs[variant] = chain(variant, layers, gammas, bufs, vops, 0).clone()
assert torch.allclose(outs["triton"], outs["cublas"], atol=1e-5) and torch.allclose(outs["fused"], outs["cublas"],
                                                                                       atol=1e-5)
print("ok")
"""


def test_the_chain_experiments_kernels_compute_what_they_replace():
    """bench/chain.py's decode GEMM (split-K with an ordered last-arriver sum; RMSNorm over a residual folded in;
    SiLU-gated epilogue) against torch, and its chain variants against each other, under Triton's interpreter."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", _CHAIN], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_kernels_are_grouped_by_what_they_do():
    from bench.run import kernel_category

    assert kernel_category("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_splitK_TNT") == "gemm"
    assert kernel_category("void cublasLt::splitKreduce_kernel<32, 16, int>") == "gemm"
    assert kernel_category("_decode_split_kernel") == "attention"
    assert kernel_category("ncclDevKernel_AllGather_RING_LL") == "all-reduce / gather"
    assert kernel_category("one_shot_push") == "all-reduce / gather"
    assert kernel_category("_add_rmsnorm_kernel") == "norm / rotary / activation (fused)"
    assert kernel_category("void at::native::elementwise_kernel<128, 4>") == "other"


def test_family_table_pairs_each_familys_lean_and_generic_runs():
    from bench.families import table

    def run(model, mode, tok, step):
        return dict(model=model, mode=mode, card="H200", tok_per_s=tok, gpu_step_ms_p50=step, floor_step_ms=2.0)

    out = table([run("llama-1b", "async", 4000.0, 2.2), run("llama-1b", "async[fast_path=false]", 2600.0, 3.1),
                 run("phi3-mini", "async[fast_path=false]", 900.0, 9.0)])  # fmt: skip
    rows = out.splitlines()[2:]
    assert rows[0] == "| llama-1b | H200 | 4,000 | 2,600 | 65% | 2.20 | 3.10 | 2.00 | 1.10× |"
    assert rows[1] == "| phi3-mini | H200 | — | 900 | — | — | 9.00 | 2.00 | — |"


async def test_tracing_records_every_lane(make_model, tokenizer):
    model, _ = make_model("llama")
    async with Engine(model, tokenizer, EngineConfig(block_size=8)) as engine:
        engine.start_trace()
        await engine.generate("hello", SamplingParams(max_new_tokens=5))
        trace = engine.stop_trace()
    assert {lane for lane, _, _ in trace.spans} == set(LANES)
    assert all(e >= s for _, s, e in trace.spans)
    assert len(trace.lane("device")) == 5  # one prefill step that samples, four decode steps


async def test_step_timing_on_the_cpu_records_each_step(make_model, tokenizer):
    """``record_step_timing`` on the CPU: the worker's compute per step, on the host clock (it used to fail every
    step, reaching for CUDA events)."""
    model, _ = make_model("llama")
    config = EngineConfig(block_size=8, record_step_timing=True)
    async with Engine(model, tokenizer, config) as engine:
        out = await engine.generate("hello", SamplingParams(max_new_tokens=5, ignore_eos=True))
        intervals, shapes = engine.step_intervals(), engine.step_shapes()
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert len(intervals) == len(shapes) == 5  # the prefill that samples, then four decode steps
    assert intervals[0][0] == 0.0
    assert all(0 <= s <= e for s, e in intervals)
    assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:]))  # one worker: steps never overlap
    assert [rows for rows, _, _ in shapes] == [1] * 5 and shapes[0][1] > 1


def test_bench_run_writes_json_table_and_timeline(tmp_path, capsys):
    from bench.run import main

    try:  # the timeline picture needs matplotlib (acb[bench]); the CPU test install leaves it out
        import matplotlib  # noqa: F401

        drawing = True
    except ImportError:
        drawing = False
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    png = tmp_path / "timeline.png"
    main(
        ["--workloads", "W-tiny", "--modes", "async,sync,hf-sync", "--json", str(out), "--markdown", str(md),
         "--no-progress"] + (["--timeline", str(png)] if drawing else [])
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["mode"] for r in results] == ["hf-sync", "async", "sync"]  # transformers first, on intact weights
    w = WORKLOADS["W-tiny"]
    assert all(r["output_tokens"] == w.requests * w.new and r["workload"] == "W-tiny" for r in results)
    for key in ("tok_per_s", "ttft_p50_ms", "itl_p99_ms", "loop_lag_p99_ms", "gpu_idle", "card"):
        assert key in results[0]
    table = md.read_text()
    for mode in ("async", "sync", "hf-sync"):
        assert f"| W-tiny (CPU smoke) | {mode} |" in table
    assert table in capsys.readouterr().out
    if drawing:
        picture = tmp_path / "timeline-W-tiny.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_suite_plan_runs_transformers_first_and_traces_what_the_docs_draw():
    from bench.run import SUITES, _plan, main  # noqa: F401

    class Args:
        suite, timeline, workloads, modes = "docs", "t.png", "", ""

    plan = _plan(Args)
    assert plan[0] == ("W-side", ["hf-sync", "hf-async", "async", "sync"], True)
    assert {w for w, _, _ in plan} >= {"W-side", "W-blog", "W-share", "W-small"}  # every workload of the spec
    assert all("async" in modes for _, modes, _ in plan)
    Args.timeline = None
    assert not any(traced for _, _, traced in _plan(Args))


def test_report_names_provenance_and_same_run_ratios():
    from bench.run import report_markdown

    base = {"workload": "W-x", "note": "", "card": "cardX", "date": "2026-01-01", "commit": "abc", "torch": "2"}
    nan = float("nan")
    fields = dict.fromkeys(("wall_s", "gpu_idle", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                            "loop_lag_p50_ms", "loop_lag_p99_ms", "achieved_vs_floor", "gpu_step_ms_p50",
                            "loop_cpu_ms_per_step"), nan)  # fmt: skip
    rows = [{**base, **fields, "mode": m, "tok_per_s": t} for m, t in (("hf-sync", 100), ("async", 400), ("sync", 200))]
    md = report_markdown(rows, "python -m bench.run --suite docs")
    assert "cardX" in md and "abc" in md and "2026-01-01" in md and "`python -m bench.run --suite docs`" in md
    assert "W-x: acb async = 2.00× acb sync, 4.00× transformers CB sync" in md


def test_device_idle_in_a_window():
    from acb.tracing import Trace
    from bench.timeline import device_idle

    trace = Trace([("device", 0.0, 1.0), ("device", 2.0, 3.0), ("prepare", 1.0, 2.0)])
    assert device_idle(trace, 0.0, 3.0) == pytest.approx(1 / 3)
    assert device_idle(trace, 0.5, 1.0) == 0.0


def test_idle_gaps_name_the_step_after_each_gap():
    from acb.tracing import Trace
    from bench.timeline import gap_summary, idle_gaps

    trace = Trace([("device", 0.0, 1.0), ("device", 1.0, 2.0), ("device", 2.5, 3.0), ("device", 3.1, 4.0)])
    assert idle_gaps(trace) == [(2, 2.0, 0.5), (3, 3.0, pytest.approx(0.1))]
    assert gap_summary(trace).startswith("device idle 600.0 ms in 2 gaps; longest: 500.00 ms before step 2")


def test_modes_carry_engine_config_overrides_for_same_run_ab_rows():
    from bench.run import parse_mode, split_modes

    assert split_modes("hf-sync,async,sync,async[admission_group=1,overlap_depth=3]") == [
        "hf-sync", "async", "sync", "async[admission_group=1,overlap_depth=3]"
    ]  # fmt: skip
    assert parse_mode("async[admission_group=1,overlap_depth=3]") == (
        "async",
        {"admission_group": 1, "overlap_depth": 3},
    )
    assert parse_mode("sync") == ("sync", {})
    assert parse_mode("async[admission_order=longest_first,mixed_graphs=true,x=0.5]") == (
        "async",
        {"admission_order": "longest_first", "mixed_graphs": True, "x": 0.5},
    )
    with pytest.raises(ValueError):
        parse_mode("fast")


def test_poisson_arrivals_have_the_asked_rate_and_inf_means_all_at_once():
    from bench.serve import arrival_times

    times = arrival_times(4000, 10.0, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert abs(sum(gaps) / len(gaps) - 0.1) < 0.01
    assert arrival_times(4000, 10.0, seed=3) == times  # seeded
    assert arrival_times(5, float("inf")) == [0.0] * 5


@pytest.mark.parametrize("breaks", ["at connect", "mid-stream"])
def test_the_http_client_counts_a_failed_request_and_says_how_far_it_came(breaks, capsys):
    """A transport error is counted, never dropped, and the report says when it happened and how far the response
    had come (a connection closed before any response and one closed mid-stream tell different stories)."""
    import asyncio

    from bench.http_client import drive, via_http

    class Response:
        status_code = 200

        async def aiter_lines(self):
            yield 'data: {"choices": [{"text": "a"}]}'
            raise OSError("reset")

    class Client:
        def stream(self, *args, **kwargs):
            class Exchange:
                async def __aenter__(self):
                    if breaks == "at connect":
                        raise OSError("reset")
                    return Response()

                async def __aexit__(self, *exc):
                    return False

            return Exchange()

    timing = asyncio.run(drive([([1, 2], 3)], float("inf"), 0, lambda p, n, a, t: via_http(Client(), p, n, a, t)))
    assert timing.failed == 1
    err = capsys.readouterr().err
    assert "request 0 failed" in err and "s into the run" in err and "OSError('reset')" in err
    assert ("before any response" if breaks == "at connect" else "after status 200 and 1 lines") in err
    assert len(timing.ttft) == (0 if breaks == "at connect" else 1)


def test_serving_benchmark_runs_through_the_engine_and_http(tmp_path):
    """W-serve's harness end to end on the tiny model: every row measured, nothing failed, the figure drawn; the
    HTTP client in a process apart from the server's."""
    import json
    import os

    from bench.serve import main

    out, picture = tmp_path / "serve.json", tmp_path / "serve.png"
    main(["--model", "tiny", "--scale", "0.01", "--rates", "40,inf", "--json", str(out), "--plot", str(picture),
          "--markdown", str(tmp_path / "serve.md"), "--config", "prefill_chunk_tokens=16", "--stream-interval",
          "2"])  # fmt: skip
    rows = json.loads(out.read_text())
    assert all(r["config"] == "prefill_chunk_tokens=16" and r["stream_interval"] == 2 for r in rows)
    assert [(r["via"], r["rate"]) for r in rows] == [("engine", 40.0), ("http", 40.0), ("engine", float("inf")),
                                                     ("http", float("inf"))]  # fmt: skip
    assert all(r["failed"] == 0 and r["tok_per_s"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)
    # the HTTP client runs in a process of its own, the engine's own client in this one
    assert all((r["client_pid"] == os.getpid()) == (r["via"] == "engine") for r in rows)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "highest rate with TTFT p99 under 1 s" in (tmp_path / "serve.md").read_text()


def test_serving_benchmark_runs_http_through_api_processes(tmp_path):
    """``--api-processes 2``: the HTTP rows go through the server's own processes; every request served."""
    import json

    from bench.serve import main

    out = tmp_path / "serve.json"
    main(["--model", "tiny", "--scale", "0.01", "--rates", "inf", "--via", "http", "--api-processes", "2",
          "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["via"], r["api_processes"]) for r in rows] == [("http", 2)]
    assert rows[0]["failed"] == 0 and rows[0]["tok_per_s"] > 0 and rows[0]["requests"] == 10


def test_the_sse_writer_bench_reports_every_case(capsys):
    from bench.sse import main

    main(["--streams", "8", "--tokens", "20", "--burst", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["completions, n=1", "completions, n=4", "chat, n=1", "chat, n=4"]
    assert all(float(line.split(":")[1].split()[0]) > 0 for line in lines)


def test_the_sse_bench_measures_the_whole_server_over_http(capsys):
    """``bench.sse --http``: uvicorn in front of the stand-in engine, a client in another process; every token
    arrives."""
    from bench.sse import main

    main(["--http", "--streams", "6", "--tokens", "15", "--step-ms", "2"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("http, 6 streams: ") and line.endswith("µs of server CPU per token, 0 tokens missing")
    assert float(line.split(": ")[1].split()[0].replace(",", "")) > 0


def test_the_attention_table_picks_the_fastest_equal_decode_variant():
    pytest.importorskip("triton")
    from bench.attention import table

    base = dict(rows=32, ctx=512, floor_us=10.0)
    results = [
        dict(base, kernel="decode, engine's choice", splits=2, tile=None, us=14.0, equal=True),
        dict(base, kernel="decode", splits=4, tile=(64, 4, 3), us=11.0, equal=True),
        dict(base, kernel="decode", splits=8, tile=(32, 4, 2), us=9.0, equal=False),  # fastest, but wrong
        dict(base, kernel="prefill kernel (a mixed step's decode rows)", splits=None, tile=None, us=40.0, equal=True),
    ]
    row = table(results, "card").splitlines()[-1]
    assert row == "| 32 | 512 | 10.0 | 14.0 (2) | 11.0 (4, (64, 4, 3)) | 1.10× | 40.0 | False |"


def test_the_chain_bench_splits_and_reads_its_trace():
    """bench.wschain's host side: the splits fill one round of the programs, and a trace's stamps become µs from
    the first ready stage over the programs that had a task in each phase (the others' stamps are left out)."""
    torch = pytest.importorskip("torch")
    wschain = pytest.importorskip("bench.wschain")

    assert wschain.splits_for(2048, 2048, 132) == 4  # 32 tiles x 4 = 128 tasks <= 132
    assert wschain.splits_for(16384, 2048, 132) == 1  # 256 tiles: already more than one round
    assert wschain.splits_for(2048, 256, 528) == 2  # never under two boxes of K a split
    st = torch.zeros(6, 4, 3, dtype=torch.int64) + 1_795_975_307_409_677_000  # as large as the global timer's
    st[:, :, 1] += 5_000
    st[:, 1, 0] += 7_000
    st[1, 0, 0] -= 250
    st[4:, 0] = 0  # programs 4 and 5 had no task in phase 0
    rows = wschain.trace_rows(st, busy=[4, 6, 1, 1])  # (2 tiles x 2 splits, 6 tiles, ...)
    assert rows[0] == {"phase": 0, "first ready": (0.0, 0.25, 0.25), "last counted": (5.25, 5.25, 5.25)}
    assert rows[1]["first ready"] == (7.25, 7.25, 7.25) and rows[1]["wait over"] == (0.25, 0.25, 0.25)
    assert rows[2]["last counted"] == (5.25, 5.25, 5.25) and "wait over" in rows[3]


def test_the_chain_bench_traces_stages_and_chains_layers():
    """bench.wschain's third gate, host side: every stage stamp of the four traced programs is placed in its phase,
    task and stage, and a wait shows up where it happened; the torch reference chains the layers (a layer's O reads
    the first columns of the Q/K/V before it); the shared memory a variant takes decides whether it runs; the flags
    are named in a row's variant."""
    torch = pytest.importorskip("torch")
    C = pytest.importorskip("bench.wschain")

    chain = C.Chain.__new__(C.Chain)  # (the host side only: a chain's shape, no card)
    chain.G, chain.tiles, chain.splits, chain.stages = 4, [2, 6, 1, 1], [2, 1, 1, 1], [2, 3, 2, 2]
    chain.balanced = chain.waves = False
    chain.cnt = torch.zeros(C.SMID_AT + 1024, dtype=torch.int32)  # (as Chain makes it)
    st = chain.cnt[C.STAGES_AT : C.SMID_AT].view(torch.int64).view(C.TRACED, C.MAXIT)
    st[:, :20] = torch.arange(20) * 250 + 1_795_975_307_409_677_000
    st[0, 5:] += 2_000  # program 0 (tasks 0 of phase 0, 0 and 4 of phase 1, 0 of 2 and of 3) waits before stage 5
    lines = C.stage_gaps(chain)
    assert len(lines) == 5 and lines[0].startswith("program 0: first stage ready at 0.0, last at 4.8;")
    assert "2.2 before phase 1 task 1 stage 0 (at 3.2)" in lines[0] and "0.25 / 0.25 / 0.25 / 0.25" in lines[0]
    # program 0's stages after each phase's first: phases 1 (its two tasks: the wait before the second), 2 and 3
    assert lines[1].endswith(": 0.25 0.25 2.25 0.25 0.25 0.25 0.25 0.25 0.25; 0.25 0.25 0.25; 0.25")
    assert lines[4].startswith("program 3:") and "waits: none" in lines[4] and "- / -" in lines[4]
    chain.G = 8  # program 7 (the last traced) has no task in any phase
    assert C.stage_gaps(chain)[-1] == "program 7: no task"

    torch.manual_seed(0)
    layers = [[torch.randn(n, k) / k**0.5 for n, k in ((8, 4), (12, 8), (8, 6), (10, 8))] for _ in range(3)]
    x0 = torch.randn(2, 4)
    one = C.reference(x0, layers[:1], inter=6)
    assert [tuple(o.shape) for o in one] == [(2, 8), (2, 12), (2, 8), (2, 10)]
    assert torch.equal(one[2], (one[1][:, :6].float() @ layers[0][2].T).bfloat16())  # down reads gate/up's first 6
    three = C.reference(x0, layers, inter=6)
    two = C.reference(x0, layers[:2], inter=6)
    assert torch.equal(three[0], (two[3][:, :4].float() @ layers[2][0].T).bfloat16())

    red = C.RED_SUMS
    assert C.shared_bytes(8, 0) == 8 * (8192 + 4096) + 1024
    assert C.shared_bytes(8, red) == 8 * (8192 + 8192) + 2 * 4096 + 8192 + 1024  # float32 boxes, bf16 copies
    assert C.shared_bytes(8, red | C.INFLIGHT2) == C.shared_bytes(8, red) + 4096  # a third copy
    assert C.shared_bytes(12, red) <= C.SHARED < C.shared_bytes(14, red)  # (one program per SM)
    assert 2 * C.shared_bytes(6, red) <= C.SHARED < 2 * C.shared_bytes(7, red)  # (two)
    assert C.describe(C.FULL & ~C.FENCES & ~C.TICKETS | C.RED_SUMS | C.SIGNAL_WARP | C.TILE_WAITS) == (
        "the chain without fences, tickets, tile waits, a signal warp, sums by red.add"
    )
    assert C.describe(C.X_LOADS | C.PRODUCTS | C.SIGNALS) == "the chain without waits, fences, tickets: sums not made"
    # gate 4: bf16 sums take bf16 boxes and no copies to change (two programs per SM at depth 8 again)
    bf16 = red | C.BF16_SUMS
    assert C.shared_bytes(8, bf16) == 8 * (8192 + 4096) + 8192 + 1024 and 2 * C.shared_bytes(8, bf16) <= C.SHARED
    assert C.describe(C.FULL & ~C.FENCES & ~C.TICKETS | bf16 | C.SAME_BOX) == (
        "the chain without fences, tickets, sums by red.add in bf16, every weight box one box in L2"
    )
    assert C.describe(C.X_LOADS | C.SIGNALS | C.WAITS | red | C.RAW_X) == (
        "the chain without products, fences, tickets, sums by red.add, no change to bf16"
    )
    # gate 5: tasks claimed, named last; its number is not the taken-out L2_AHEAD's (1 << 18)
    assert C.describe(C.FULL & ~C.FENCES & ~C.TICKETS | bf16 | C.SIGNAL_WARP | C.DYNAMIC).endswith(
        "a signal warp, sums by red.add in bf16, tasks claimed"
    )
    assert C.DYNAMIC == 1 << 19
    assert C.describe(C.FULL & ~C.FENCES & ~C.TICKETS | bf16 | C.SIGNAL_WARP | C.BALANCED).endswith(
        "sums by red.add in bf16, equal shares"
    )
    assert C.describe(C.FULL & ~C.FENCES & ~C.TICKETS | bf16 | C.BALANCED | C.WEIGHTED).endswith(
        "sums by red.add in bf16, shares by each SM's pace"
    )
    assert C.describe(C.FULL & ~C.FENCES & ~C.TICKETS | bf16 | C.BALANCED | C.TILE_WAITS | C.WAVES).endswith(
        "tile waits, sums by red.add in bf16, equal shares, in waves"
    )
    assert C.describe(
        C.FULL & ~C.FENCES & ~C.TICKETS | bf16 | C.BALANCED | C.TILE_WAITS | C.WAVES | C.POLL_EARLY
    ).endswith("in waves, polls early")


def _balanced_chain(C, shapes, programs, least):
    chain = C.Chain.__new__(C.Chain)  # (the host side only: a chain's shape, no card)
    chain.G, chain.balanced, chain.waves = programs, True, False
    chain.tiles = [n // C.TILE[0] for n, _ in shapes]
    chain.stages = [k // C.TILE[1] for _, k in shapes]
    chain.splits = C.equal_shares(shapes, programs, least)
    return chain


@pytest.mark.parametrize("programs", [132, 264])
@pytest.mark.parametrize("least", [1, 4])
@pytest.mark.parametrize("model", ["llama-1b", "qwen2.5-1.5b", "gemma3-1b", "phi3-mini"])
def test_the_chain_bench_shares_each_phase_equally(model, least, programs):
    """bench.wschain's gate 5 (BALANCED), host side, as the kernel splits a phase: every weight box of every phase
    goes to exactly one program; the programs that share a phase take shares that differ by one box at most, of
    ``least`` boxes or more (fewer programs share a small phase); each task is a run of one tile's K boxes."""
    pytest.importorskip("transformers")
    C = pytest.importorskip("bench.wschain")
    from bench.ring import shapes

    chain = _balanced_chain(C, C.chain_shapes(shapes(model)), programs, least)
    for p, (tiles, boxes, sharing) in enumerate(zip(chain.tiles, chain.stages, chain.splits)):
        seen = [0] * (tiles * boxes)
        shares = []
        for pid in range(programs):
            tasks = chain.spans(p, pid)
            assert all(n >= 1 and 0 <= k0 and k0 + n <= boxes for _, k0, n in tasks)
            assert [t for t, _, _ in tasks] == list(range(tasks[0][0], tasks[0][0] + len(tasks))) if tasks else True
            for t, k0, n in tasks:
                for k in range(k0, k0 + n):
                    seen[t * boxes + k] += 1
            shares.append(sum(n for _, _, n in tasks))
        assert seen == [1] * (tiles * boxes)
        assert all(s == 0 for s in shares[sharing:]) and max(shares) - min(shares[:sharing]) <= 1
        assert min(shares[:sharing]) >= min(least, tiles * boxes) and chain.busy()[p] == sharing
    # qwen2.5-1.5b's gate/up at 132 programs: 280 tiles of 24 boxes; in turn 16 programs take three tiles
    if model == "qwen2.5-1.5b" and programs == 132:
        assert sum(n for _, _, n in chain.spans(1, 0)) == 280 * 24 // 132 < 3 * 24


@pytest.mark.parametrize("waves", [2, 3])
@pytest.mark.parametrize("model", ["llama-1b", "qwen2.5-1.5b", "gemma3-1b", "mistral-3b"])
def test_the_chain_bench_runs_each_phase_in_waves(model, waves):
    """bench.wschain's WAVES, host side, as the kernel splits a phase into blocks (waves of tiles times chunks of
    K): every box of every phase goes to exactly one program; every program has a share of every block, in block
    order; and a task in K chunk c reads only tiles of wave c of the phase before (down's boxes their gate tile and
    its up twin too), so a program's first block of a phase needs only the first wave of the phase before."""
    pytest.importorskip("transformers")
    C = pytest.importorskip("bench.wschain")
    from bench.ring import shapes

    shp = C.chain_shapes(shapes(model))
    programs = 132
    chain = _balanced_chain(C, shp, programs, 1)
    chain.waves, chain.splits = True, [waves] * 4
    if any(t % C.blocks(p, waves)[0] or k % C.blocks(p, waves)[1] or p == 1 and t // waves % 2
           for p, (t, k) in enumerate(zip(chain.tiles, chain.stages))):  # fmt: skip
        pytest.skip(f"{waves} waves do not divide {model}'s phases")

    def wave_of(p, tile):  # (the wave of phase p that makes ``tile``; gate/up's positions hold its tiles in pairs)
        t = chain.tiles[p]
        pos = 2 * tile if p != 1 or tile < t // 2 else 2 * (tile - t // 2) + 1
        return (pos if p == 1 else tile) // (t // C.blocks(p, waves)[0])

    for p, (tiles, boxes) in enumerate(zip(chain.tiles, chain.stages)):
        seen = [0] * (tiles * boxes)
        kc = boxes // C.blocks(p, waves)[1]
        for pid in range(programs):
            tasks = chain.spans(p, pid)
            assert all(1 <= n <= kc and k0 // kc == (k0 + n - 1) // kc for _, k0, n in tasks)  # (within a chunk)
            for tile, k0, n in tasks:
                for k in range(k0, k0 + n):
                    seen[tile * boxes + k] += 1
                if p > 0:  # K box k is tile k of the phase before (and down's, its up twin too)
                    reads = [k for k in range(k0, k0 + n)] + ([k + chain.tiles[1] // 2 for k in range(k0, k0 + n)]
                                                              if p == 2 else [])  # fmt: skip
                    assert {wave_of(p - 1, r) for r in reads} == {k0 // kc}
            if p > 0:
                assert tasks[0][1] < kc  # (the first task reads the first wave)
        assert seen == [1] * (tiles * boxes)
    assert chain.busy() == [programs] * 4


def test_the_chain_bench_weighs_the_shares_by_each_sms_pace():
    """bench.wschain's WEIGHTED, host side: every box of a phase goes to exactly one SM, in SM order, each SM's
    share in proportion to its pace (a faster SM more); the table the kernel reads holds each SM's [b0, b1) at
    ``2 * smid``; the waits' targets are the tasks (tiles touched) of all the shares."""
    torch = pytest.importorskip("torch")
    C = pytest.importorskip("bench.wschain")

    chain = _balanced_chain(C, [(2048, 2048), (16384, 2048), (2048, 8192), (3072, 2048)], 4, 1)
    chain.tick = torch.zeros(8 * C.TMAX, dtype=torch.int32)
    pace = {3: 1.0, 7: 2.0, 8: 1.0, 40: 4.0}  # (SM ids need not be 0..G-1)
    shares = chain.weigh(pace)
    table = chain.tick[4 * C.TMAX :].view(-1)
    for p, (tiles, boxes) in enumerate(zip(chain.tiles, chain.stages)):
        got = shares[p]
        assert [got[sm] for sm in (3, 7, 8, 40)] == sorted(got.values())  # (SM order, contiguous)
        assert got[3][0] == 0 and got[40][1] == tiles * boxes
        assert all(got[a][1] == got[b][0] for a, b in ((3, 7), (7, 8), (8, 40)))
        sizes = {sm: b1 - b0 for sm, (b0, b1) in got.items()}
        assert abs(sizes[40] - tiles * boxes * 4 / 8) <= 1 and abs(sizes[7] - 2 * sizes[3]) <= 2
        for sm, (b0, b1) in got.items():
            assert table[p * C.SHW + 2 * sm].item() == b0 and table[p * C.SHW + 2 * sm + 1].item() == b1
    # llama-1b's O (32 tiles of 32 boxes): shares of 128, 256, 128 and 512 boxes touch 4, 8, 4 and 16 tiles
    assert chain.a0 == sum(len(range(b0 // 32, -(-b1 // 32))) for b0, b1 in shares[3].values())
    assert chain.targets[0] == 4 + 8 + 4 + 16
    with pytest.raises(ValueError, match="5 SMs paced for 4 programs"):
        chain.weigh({**pace, 9: 1.0})


def test_the_chain_bench_checks_every_run_against_its_largest_value(monkeypatch):
    """bench.wschain's check: each run's outputs against the reference, the largest error as a share of the
    largest value (at least 1); a second run is checked too (a counter that was not reset shows there)."""
    torch = pytest.importorskip("torch")
    C = pytest.importorskip("bench.wschain")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    want = [torch.tensor([[4.0, -2.0]]), torch.tensor([[0.5, 0.25]])]
    runs = [
        [torch.tensor([[4.0, -2.2]]), torch.tensor([[0.5, 0.25]])],  # 0.2 of 4
        [torch.tensor([[4.0, -2.0]]), torch.tensor([[0.5, 0.75]])],
    ]  # 0.5 of (at least) 1: the second run
    calls = []

    def chain(x0desc, lw):
        calls.append(lw)
        return runs[len(calls) - 1]

    assert C.check(chain, None, "layer", want, runs=2) == pytest.approx(0.5) and calls == ["layer", "layer"]
    calls.clear()
    assert C.check(chain, None, "layer", want, runs=0) == pytest.approx(0.05) and len(calls) == 1  # (timed only)


def test_the_kernel_spikes_report_a_table_and_their_json(tmp_path, capsys, monkeypatch):
    """bench.ring's ``report`` (bench.ring, bench.wsgemm and bench.wschain end with it): a markdown row per result,
    and the JSON layout of their committed raw results (the copy bandwidth, the card, the rows)."""
    torch = pytest.importorskip("torch")
    ring = pytest.importorskip("bench.ring")

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a card")
    rows = [dict(model="llama-1b", us=53.7, floor_us=28.77), dict(model="mistral-3b", us=71.9, floor_us=50.39)]
    cells = {"model": lambda r: r["model"], "µs": lambda r: f"{r['us']:.1f}",
             "/ floor": lambda r: f"{r['us'] / r['floor_us']:.2f}×"}  # fmt: skip
    ring.report(rows, cells, 4.2e12, str(tmp_path / "out.json"))
    assert capsys.readouterr().out.splitlines() == [
        "| model | µs | / floor |", "|---|---|---|", "| llama-1b | 53.7 | 1.87× |", "| mistral-3b | 71.9 | 1.43× |"
    ]  # fmt: skip
    assert json.loads((tmp_path / "out.json").read_text()) == dict(bandwidth=4.2e12, device="a card", rows=rows)
