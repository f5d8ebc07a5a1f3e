"""The ``acb`` command: ``acb generate``, ``acb serve``, ``acb batch``.

Every command runs with no arguments on the embedded default model (a tiny random Llama, no download).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any

from .config import ADMISSION_ORDERS, EngineConfig, SamplingParams
from .errors import AcbError
from .loop import run, uvloop_available
from .sampling_params import MAX_GRAMMAR_CHARS

DEFAULT_PROMPT = "Once upon a time"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="local directory or hub id of a transformers causal LM (default: the embedded tiny random model)",
    )
    g.add_argument("--device", help="device to run on, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="compute dtype (default: the model's)")  # fmt: skip
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per step (default: %(default)s)")
    e.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget per step (default: %(default)s)"
    )
    e.add_argument(
        "--prefill-chunk-tokens", type=int, help="prompt tokens per step while streams decode (default: the budget)"
    )
    e.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized from free memory)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    e.add_argument(
        "--max-model-len",
        type=int,
        help="longest prompt + output (default: the model's max_position_embeddings; no more than its positions)",
    )
    e.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="split the model over this many GPUs (default: %(default)s)"
    )
    e.add_argument(
        "--admission-order", choices=ADMISSION_ORDERS, default="arrival",
        help="which queued request starts first: arrival, or longest_first for offline batches (default: %(default)s)",
    )  # fmt: skip
    e.add_argument("--sync", action="store_true", help="step synchronously (no CPU/GPU overlap; for comparison)")
    e.add_argument("--no-uvloop", action="store_true", help="use plain asyncio even if uvloop is installed")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampling (what is not given comes from the model's generation config, then acb's "
                             "defaults: greedy, 256 tokens)")  # fmt: skip
    s.add_argument("--max-new-tokens", type=int, help="tokens to generate")
    s.add_argument("--temperature", type=float, help="0 = greedy")
    s.add_argument("--top-p", type=float, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = off")
    s.add_argument("--seed", type=int, help="seed for reproducible sampling")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    s.add_argument("--presence-penalty", type=float, help="OpenAI's presence penalty, in [-2, 2]")
    s.add_argument("--frequency-penalty", type=float, help="OpenAI's frequency penalty, in [-2, 2]")
    s.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty (1 = off)")
    s.add_argument("--min-tokens", type=int, help="hold back EOS until the output has this many tokens")
    c = s.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid against this schema file")
    c.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    c.add_argument("--regex", help="constrain the output to match this regular expression")
    c.add_argument("--grammar", metavar="FILE", help="constrain the output to this EBNF grammar (GBNF) file")


# fields a batch line or the command line may set, by name (SamplingParams validates every value)
BATCH_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "min_tokens", "logit_bias", "json_schema", "json_object",
                "regex", "grammar", "logprobs", "top_logprobs")  # fmt: skip


def _params(engine, a: argparse.Namespace, **override: Any) -> SamplingParams:
    """The engine's defaults, with what the command line (and a batch line) set."""
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_tokens", "regex", "json_schema", "grammar")  # fmt: skip
    # (the schema's and the grammar's files were read by main; an empty one is given, and refused)
    given = {k: getattr(a, k) for k in names if getattr(a, k) is not None}
    given.update({flag: True for flag in ("ignore_eos", "json_object") if getattr(a, flag)})
    if a.stop:
        given["stop"] = list(a.stop)
    given.update(override)
    return dataclasses.replace(engine.default_params, **given)


def _read_text(path: str, most: int) -> str:
    """A constraint file's text, up to ``most`` characters (a longer one is refused, never read whole)."""
    with open(path, encoding="utf-8") as f:
        text = f.read(most + 1)
    if len(text) > most:
        raise OSError(f"{path} is longer than {most:,} characters")
    return text


def _engine(a: argparse.Namespace):
    """Build the engine (blocking: loads weights). Called before the event loop starts."""
    import torch

    from .engine import Engine

    config = dict(
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        prefill_chunk_tokens=a.prefill_chunk_tokens,
        num_kv_blocks=a.num_kv_blocks,
        block_size=a.block_size,
        max_model_len=a.max_model_len,
        overlap=not a.sync,
        tensor_parallel_size=a.tensor_parallel_size,
        admission_order=a.admission_order,
    )
    if getattr(a, "drain_timeout", None) is not None:
        config["drain_timeout"] = a.drain_timeout
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device (torch {torch.__version__})")
    if a.model:
        return Engine.from_pretrained(a.model, dtype=a.dtype, device=device, **config)
    from .default_model import load_default

    model, tokenizer = load_default()
    return Engine(model, tokenizer, EngineConfig(device=device, dtype=a.dtype, **config))


# -- acb generate -------------------------------------------------------------------------------------------------


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}
_CONTROL.update({c: f"\\x{c:02x}" for c in range(0x80, 0xA0)})  # C1 controls (an ESC-less terminal escape)


def printable(text: str) -> str:
    """``text`` with control characters (all but newline, tab and carriage return) escaped: a terminal must not be
    steered by what a model generates."""
    return text.translate(_CONTROL)


async def _generate(engine, a: argparse.Namespace) -> None:
    async with engine:
        prompt = a.prompt
        if a.chat:
            prompt = await engine.apply_chat_template([{"role": "user", "content": a.prompt}])
        last = None
        terminal = sys.stdout.isatty()
        async for tok in engine.stream(prompt, _params(engine, a)):
            sys.stdout.write(printable(tok.text) if terminal else tok.text)
            sys.stdout.flush()
            last = tok
        sys.stdout.write("\n")
        if last is not None:
            print(f"[finish: {last.finish_reason}]", file=sys.stderr)


# -- acb serve ----------------------------------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _at_least(low: int, high: int | None = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``; refused before any model is loaded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}")
        return value

    return parse


MAX_API_PROCESSES = 64  # each is an interpreter of its own; two already serve thousands of tokens per second


async def _serve(engine, a: argparse.Namespace) -> None:
    from .serving import serve, serve_processes

    async with engine:
        print(f"acb: {summary(engine)}", file=sys.stderr)
        where = f" in {a.api_processes} API processes" if a.api_processes else ""
        options = dict(
            log_level=a.log_level,
            max_body_bytes=a.max_body_bytes,
            stream_interval=a.stream_interval,
            timeout_keep_alive=a.timeout_keep_alive,
            api_key=a.api_key or os.environ.get("ACB_API_KEY") or None,
            on_ready=lambda url: print(
                f"acb: serving on {url}/v1{where} (model '{a.served_model_name or engine_name(engine)}')",
                file=sys.stderr,
            ),
        )
        if a.api_processes:
            await serve_processes(engine, a.api_processes, a.host, a.port, a.served_model_name, **options)
        else:
            await serve(engine, a.host, a.port, a.served_model_name, **options)


def summary(engine) -> str:
    """One line on what the engine runs: model, device and dtype, path, KV cache, limits."""
    stats = engine.stats()
    path = "lean (fused kernels" + (", CUDA graphs" if engine.device.type == "cuda" else "") + ")"
    return (
        f"model '{engine_name(engine)}' on {engine.device} in {str(engine.dtype).removeprefix('torch.')}, "
        f"{path if engine.fast_path else 'generic (transformers modules)'}; KV cache {stats.kv_blocks_total} blocks "
        f"of {engine.config.block_size} tokens; max_model_len {engine.max_model_len}, "
        f"max_num_seqs {engine.config.max_num_seqs}; prefix caching {'on' if engine.config.prefix_caching else 'off'}"
    )


def engine_name(engine) -> str:
    return getattr(engine.model.config, "_name_or_path", None) or "acb-default"


# -- acb batch ----------------------------------------------------------------------------------------------------

DEMO_PROMPTS = [
    f"Prompt number {i}: tell me a story about {topic}"
    for i, topic in enumerate(["the sea", "a robot", "東京", "a dragon 🐉", "asyncio", "GPUs", "a cat", "the moon"] * 8)
]


def _read_jobs(path: str | None) -> list[tuple[int, str]]:
    if path is None and sys.stdin.isatty():
        print(f"acb batch: no --input given: running {len(DEMO_PROMPTS)} demo prompts", file=sys.stderr)
        return [(i, json.dumps({"prompt": p})) for i, p in enumerate(DEMO_PROMPTS)]
    stream = sys.stdin if path in (None, "-") else open(path, encoding="utf-8")  # noqa: SIM115
    with stream:
        return [(i, line) for i, line in enumerate(stream) if line.strip()]


async def _batch(engine, a: argparse.Namespace) -> None:
    from tqdm import tqdm

    jobs = await asyncio.to_thread(_read_jobs, a.input)
    out = sys.stdout if a.output == "-" else open(a.output, "w", encoding="utf-8")  # noqa: SIM115
    done: dict[int, dict] = {}
    next_to_write = 0
    limit = asyncio.Semaphore(a.concurrency)
    counts = {"ok": 0, "error": 0}
    bar = tqdm(total=len(jobs), unit="req", file=sys.stderr, disable=a.no_progress)

    async def one(index: int, line: str) -> None:
        async with limit:
            record: dict[str, Any] = {"index": index}
            try:
                job = json.loads(line)
                if isinstance(job, str):
                    job = {"prompt": job}
                if not isinstance(job, dict) or "prompt" not in job:
                    raise ValueError('each line must be a JSON string or an object with a "prompt"')
                record["id"] = job.get("id", index)
                unknown = sorted(set(job) - {"prompt", "id", *BATCH_FIELDS})
                if unknown:  # a misspelt field must not run as if it had not been given
                    raise ValueError(f"unknown fields {unknown}; a line takes prompt, id and {', '.join(BATCH_FIELDS)}")
                overrides = {k: job[k] for k in BATCH_FIELDS if k in job}
                c = await engine.generate(job["prompt"], _params(engine, a, **overrides))
                record.update(
                    text=c.text,
                    token_ids=c.token_ids,
                    finish_reason=c.finish_reason,
                    prompt_tokens=len(c.prompt_token_ids),
                )
                if c.logprobs is not None:  # asked for: per token, and its alternatives with top_logprobs
                    record["logprobs"] = c.logprobs
                if c.top_logprobs is not None:
                    record["top_logprobs"] = [[list(alt) for alt in alts] for alts in c.top_logprobs]
                counts["ok"] += 1
            except (AcbError, ValueError, TypeError) as exc:  # one bad line never sinks the batch
                record["error"] = {"type": type(exc).__name__, "message": str(exc)}
                counts["error"] += 1
            done[index] = record
            bar.update()

    def flush() -> None:
        nonlocal next_to_write
        while next_to_write < len(jobs) and jobs[next_to_write][0] in done:
            out.write(json.dumps(done.pop(jobs[next_to_write][0]), ensure_ascii=False) + "\n")
            next_to_write += 1

    async with engine:
        tasks = [asyncio.create_task(one(i, line)) for i, line in jobs]
        for t in asyncio.as_completed(tasks):
            await t
            flush()
    bar.close()
    if out is not sys.stdout:
        out.close()
    print(f"acb batch: {counts['ok']} completed, {counts['error']} failed", file=sys.stderr)
    if counts["error"]:
        raise _Failed(counts["error"])


# -- entry point --------------------------------------------------------------------------------------------------


class _Failed(Exception):
    """``acb batch``: some lines failed (each has its error in the output)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="acb", description="asyncio-native LLM inference with continuous batching")
    parser.add_argument("--version", action="version", version=f"acb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="stream one prompt's completion to the terminal",
        description="Stream one prompt's completion to the terminal.",
    )
    g.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the prompt (default: %(default)r)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    _model_args(g)
    _sampling_args(g)

    s = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument(
        "--port", type=_at_least(0, 65535), default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    s.add_argument("--served-model-name", help="the model id clients use (default: the model path)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument(
        "--max-body-bytes",
        type=_at_least(1),
        default=8 * 1024 * 1024,
        help="largest request body; larger ones get 413 before they are read (default: %(default)s)",
    )
    s.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 (default: $ACB_API_KEY if set, else no key)",
    )
    s.add_argument(
        "--stream-interval",
        type=_at_least(1),
        default=1,
        help="tokens per streamed write: 1 writes each token as it is computed, N groups up to N per write (less "
        "server CPU per token; tokens arrive in groups) (default: %(default)s)",
    )
    s.add_argument(
        "--api-processes",
        type=_at_least(0, MAX_API_PROCESSES),
        default=0,
        help="run the HTTP server in this many processes of its own, apart from the engine's event loop (for "
        "thousands of streamed tokens per second: docs/serving.md); 0 serves from the engine's process "
        f"(at most {MAX_API_PROCESSES}; default: %(default)s)",
    )
    s.add_argument(
        "--timeout-keep-alive",
        type=_positive_seconds,
        default=75.0,  # acb.serving.app.DEFAULT_TIMEOUT_KEEP_ALIVE_S (not imported: the server extra may be absent)
        metavar="SECONDS",
        help="seconds an idle HTTP connection stays open; keep it longer than your clients' and proxies' idle "
        "expiry (httpx and the openai client: 5 s), or a request sent as the server closes the connection fails "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds open requests may run on after SIGTERM/SIGINT before they are ended (default: %(default)s)",
    )
    _model_args(s)

    b = sub.add_parser(
        "batch",
        help="complete prompts from a JSONL file into a JSONL file",
        description='Each input line is a JSON string or an object with "prompt", an optional "id", and any of '
        + ", ".join(f'"{k}"' for k in BATCH_FIELDS)
        + ' (SamplingParams fields; "json_schema" as an object; any other field fails the line). Output lines keep '
        'the input order, with "logprobs" and "top_logprobs" where asked; a line that fails gets an "error", and '
        "the exit status is then 1.",
    )
    b.add_argument("--input", "-i", help="input JSONL ('-' for stdin; default: stdin, or demo prompts on a terminal)")
    b.add_argument("--output", "-o", default="-", help="output JSONL (default: stdout)")
    b.add_argument(
        "--concurrency", type=_at_least(1), default=512, help="requests in flight at once (default: %(default)s)"
    )
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _model_args(b)
    _sampling_args(b)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    # files named on the command line are read once, here: a grammar as far as SamplingParams takes one, a schema
    # further (the limit applies to its compact JSON, which an indented file is several times longer than)
    for name, most in (("json_schema", 16 * MAX_GRAMMAR_CHARS), ("grammar", MAX_GRAMMAR_CHARS)):
        path = getattr(a, name, None)
        if path:
            try:
                setattr(a, name, _read_text(path, most))
            except OSError as exc:
                parser.error(f"--{name.replace('_', '-')}: {exc}")
    try:
        engine = _engine(a)
        command = {"generate": _generate, "serve": _serve, "batch": _batch}[a.command]
        run(command(engine, a), uvloop=False if a.no_uvloop else uvloop_available())
    except KeyboardInterrupt:
        return 130
    except _Failed:
        return 1
    except (AcbError, OSError, ValueError, ImportError) as exc:
        print(f"acb {a.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
