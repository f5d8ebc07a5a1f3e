"""Grammar engines side by side on the host: compile time and per-token mask time, xgrammar vs llguidance.

    python -m bench.grammar_engines [--vocab 128256] [--tokens 300]

The same tokenizer (the benchmarks' synthetic byte-level BPE at a Llama-3-sized vocabulary), the same JSON
schemas, the same random logits (a fixed seed), each engine sampling under its own masks (they spell compact
JSON differently: xgrammar writes ``", "`` and ``": "``, llguidance ``","`` and ``":"``). Per schema, the first
compile (cold) and a second one (xgrammar's cache; llguidance compiles lazily, so its first masks include work
that xgrammar does at compile time), and the time to fill one row's mask, p50/p99 over the sequence.
Single-threaded, on this machine's CPU: quote ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .run import LONG_SCHEMA
from .workloads import synthetic_tokenizer

SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
    },
    "nested + enums + arrays (bench)": LONG_SCHEMA,
}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def run_xgrammar(tok, vocab: int, schema: dict, n: int, seed: int) -> tuple[dict, list[int]]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    text = json.dumps(schema)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(text, any_whitespace=False)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile_json_schema(text, any_whitespace=False)
    warm = time.perf_counter() - t
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    g = torch.Generator().manual_seed(seed)
    times, tokens = [], []
    for _ in range(n):
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t)
        logits = torch.randn(1, vocab, generator=g)
        xgr.apply_token_bitmask_inplace(logits, mask)
        token = int(logits.argmax())
        if not matcher.accept_token(token) or matcher.is_terminated():
            break
        tokens.append(token)
    return {"compile_ms": cold * 1e3, "compile_cached_ms": warm * 1e3, "mask_us": times}, tokens


def run_llguidance(tok, vocab: int, schema: dict, n: int, seed: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    llguidance.LLMatcher(lltok, grammar)
    warm = time.perf_counter() - t
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    g = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        times.append(time.perf_counter() - t)
        logits = torch.randn(1, vocab, generator=g)
        llguidance.torch.apply_token_bitmask_inplace(logits, mask)
        if not matcher.consume_token(int(logits.argmax())) or matcher.is_stopped():
            break
    return {"compile_ms": cold * 1e3, "compile_cached_ms": warm * 1e3, "mask_us": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok = synthetic_tokenizer(args.vocab)
    print(f"vocabulary {args.vocab}, up to {args.tokens} tokens per schema, one thread\n")
    print("| schema | engine | compile ms (first) | compile ms (again) | mask µs p50 | mask µs p99 | tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, schema in SCHEMAS.items():
        xg, _ = run_xgrammar(tok, args.vocab, schema, args.tokens, args.seed)
        rows = [("xgrammar", xg)]
        try:
            rows.append(("llguidance", run_llguidance(tok, args.vocab, schema, args.tokens, args.seed)))
        except ImportError:
            print(f"| {name} | llguidance | not installed (`pip install llguidance`) | | | | |")
        for engine, r in rows:
            us = [x * 1e6 for x in r["mask_us"]]
            print(f"| {name} | {engine} | {r['compile_ms']:.1f} | {r['compile_cached_ms']:.2f} | "
                  f"{statistics.median(us):.1f} | {_pct(us, 99):.1f} | {len(us)} |")  # fmt: skip


if __name__ == "__main__":
    main()
