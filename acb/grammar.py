"""Structured output: JSON schemas, JSON objects, regular expressions and EBNF grammars, through xgrammar.

Two halves, on two threads:

- **compile** (admission, in the engine's grammar thread): a request's constraint becomes an xgrammar
  ``CompiledGrammar`` (cached by its text, so a schema that many requests share compiles once), then a matcher of
  its own. A constraint that does not compile is the request's typed error.
- **mask** (the step worker, :class:`GrammarMasks`): for a step with constrained rows, the worker launches the
  forward first, then brings each matcher up to date with the tokens sampled since its last mask, fills the
  allowed-token bitmask on the host, and copies it to the device, where it is applied just before sampling. The
  host work runs while the GPU computes the forward; only sampling waits for it. Overlap keeps working: step N+1
  is launched before step N's tokens reach the event loop; the worker reads them itself (waiting on step N's
  event, which completes before step N+1's forward does).

Why xgrammar (``bench/grammar_engines.py``, one CPU thread, a 128k byte-level vocabulary): it fills a mask in
8-16 µs at the median against llguidance's 32-102 µs, and its compiled grammars are cached (a second compile of
the same schema: 0.05 ms). Its costs: a first compile can be long for large repetition counts (1.4 s for an array
with ``minItems: 400``; llguidance compiles lazily, in 4 ms, and pays per token instead), and its p99 mask time on
such a schema is higher (2.6 ms against 0.4). Per step, the median is what counts: on the card, eight constrained
rows cost 1 ms of host time per step, hidden behind a 6 ms forward. xgrammar's JSON output is compact
(``any_whitespace=False``): a model, especially an untrained one, cannot fill the output with whitespace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidSamplingParamsError

__all__ = ["GrammarCompiler", "Grammar", "GrammarMasks"]

log = logging.getLogger("acb")

_CACHE_SIZE = 256  # compiled constraints kept (LRU); a compiled JSON schema is a few hundred KB at most


class Grammar:
    """One request's constraint state: an xgrammar matcher, advanced by the step worker only; ``also`` a fixed
    bitmask of tokens allowed at all (JSON constraints: none with a raw control character, see
    :meth:`GrammarCompiler.json_words`)."""

    __slots__ = ("matcher", "also", "failed")

    def __init__(self, matcher, also: torch.Tensor | None = None) -> None:
        self.matcher = matcher
        self.also = also
        self.failed = False  # a sampled token the matcher refused (cannot happen when the mask was applied)

    def accept(self, token: int) -> None:
        if self.failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token):
            self.failed = True
            log.error("the grammar refused token %d that was sampled under its own mask", token)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary (the model's logits width). Thread-safe; blocking:
    call it in a worker thread. xgrammar is imported on first use (it takes a moment)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = stop_ids
        self._compiler = None
        self._info = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()
        self._json_words: torch.Tensor | None = None

    def _get(self):
        if self._compiler is None:
            import xgrammar as xgr

            self._info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids or None
            )
            self._compiler = xgr.GrammarCompiler(self._info, max_threads=1)
        return self._compiler

    def compile(self, kind: str, text: str):
        """The compiled grammar of a constraint (``SamplingParams.constraint``), or InvalidSamplingParamsError."""
        key = (kind, text)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            compiler = self._get()
        try:
            if kind == "json_schema":
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(text)
            else:
                compiled = compiler.compile_grammar(text)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
            raise InvalidSamplingParamsError(f"the {kind} could not be compiled: {exc}", param=kind) from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, kind: str, text: str) -> Grammar:
        import xgrammar as xgr

        compiled = self.compile(kind, text)
        return Grammar(xgr.GrammarMatcher(compiled), self.json_words() if kind.startswith("json") else None)

    def json_words(self) -> torch.Tensor:
        """The bitmask (int32 words, xgrammar's layout) of tokens with no raw control character (bytes below 0x20).
        Compact JSON never contains one (strings escape them), but xgrammar 0.2's rule for strings with
        ``maxLength`` lets them through; JSON constraints apply this mask as well."""
        if self._json_words is None:
            self._get()
            info = self._info
            special = set(info.special_token_ids) | set(info.stop_token_ids)
            words = (self._vocab_size + 31) // 32
            allowed = np.ones(words * 32, np.bool_)
            for i, piece in enumerate(info.decoded_vocab[: self._vocab_size]):
                if piece and min(piece) < 0x20 and i not in special:
                    allowed[i] = False
            bits = allowed.reshape(words, 32).astype(np.int64) << np.arange(32, dtype=np.int64)
            self._json_words = torch.from_numpy(bits.sum(1).astype(np.uint32).view(np.int32))
        return self._json_words


@dataclass(slots=True)
class _Feed:
    tokens: torch.Tensor  # [S] on the host, valid once ``event`` completed
    event: torch.cuda.Event | None
    rows: list[tuple[int, Grammar]]


class GrammarMasks:
    """The step worker's half: keeps matchers up to date with sampled tokens and builds each step's masks."""

    def __init__(self, max_rows: int, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._max_rows = max_rows
        self._bitmask: torch.Tensor | None = None  # [max_rows, ceil(V / 32)] int32, pinned on CUDA
        self._shifts: torch.Tensor | None = None
        self._feeds: list[_Feed] = []
        self.fill_seconds = 0.0  # host time spent bringing matchers up to date and filling masks (benchmarks)
        self.fills = 0  # steps that did

    def _catch_up(self, wait: bool) -> None:
        """Feed sampled tokens to their matchers, oldest step first (``wait``: also those still in flight)."""
        while self._feeds:
            feed = self._feeds[0]
            if feed.event is not None:
                if not wait and not feed.event.query():
                    return
                feed.event.synchronize()  # releases the GIL; the event loop keeps running
            tokens = feed.tokens.tolist()
            for row, grammar in feed.rows:
                if tokens[row] >= 0:
                    grammar.accept(tokens[row])
            self._feeds.pop(0)

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, Grammar]]) -> None:
        """Set the logits of every token a row's grammar forbids to -inf (``rows``: (sampling row, grammar))."""
        self._catch_up(wait=True)
        t0 = time.perf_counter()
        vocab = logits.shape[-1]
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.shape[1] != words:
            self._bitmask = torch.empty(self._max_rows, words, dtype=torch.int32, pin_memory=self._cuda)
            self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        bitmask = self._bitmask[: len(rows)]
        for i, (_, grammar) in enumerate(rows):
            if grammar.matcher.is_terminated() or grammar.failed:
                bitmask[i].fill_(-1)  # nothing left to constrain: the request ends with this token
            else:
                grammar.matcher.fill_next_token_bitmask(bitmask, i)
                if grammar.also is not None:
                    bitmask[i] &= grammar.also
        self.fill_seconds += time.perf_counter() - t0
        self.fills += 1
        mask = bitmask.to(self.device, non_blocking=True)
        allowed = ((mask[:, :, None] >> self._shifts) & 1).bool().view(len(rows), -1)[:, :vocab]
        index = torch.tensor([r for r, _ in rows], dtype=torch.int64).to(self.device, non_blocking=True)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

    def record(self, tokens: torch.Tensor, rows: list[tuple[int, Grammar]]) -> None:
        """Remember a step's samples for its constrained rows (fed to their matchers before their next mask)."""
        event = None
        if self._cuda:
            tokens = tokens.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._feeds.append(_Feed(tokens, event, rows))
        self._catch_up(wait=False)
