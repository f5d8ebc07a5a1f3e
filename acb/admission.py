"""Admission: turn what a user submitted into a validated token list, or a typed error at the boundary; and the
queue of admitted requests waiting for the scheduler, with its backpressure.

Work is bounded before it is done: a text prompt longer than ``max_prompt_chars`` is refused before the tokenizer
sees it (a chat: the prompt rendered with its chat template, template text included; its contents alone are checked
before rendering). Short prompts are tokenized on the event loop (microseconds); long ones, chat templates and large
stop-string sets in the engine's own tokenizer thread, so the loop stays responsive and a flood of large prompts
queues there instead of filling the default thread pool that the application shares.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import heapq
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from typing import TypeVar

from . import aio
from .config import SamplingParams
from .errors import (
    EngineClosedError,
    InvalidPromptError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    PromptTooLongError,
    RequestFailedError,
)
from .grammar import Grammar, GrammarCompiler
from .stops import StopStrings, compile_stops

__all__ = ["Admission", "AdmissionQueue", "Prompt", "require_params"]

Prompt = str | list[int]
T = TypeVar("T")

_INLINE_STOP_CHARS = 1024  # stop-string sets up to this many characters compile on the loop (cached, microseconds)


class Admission:
    def __init__(
        self,
        tokenizer,
        *,
        vocab_size: int,
        max_model_len: int,
        max_cache_tokens: int,
        long_prompt_chars: int,
        max_prompt_chars: int,
        eos_ids: list[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.grammars = GrammarCompiler(tokenizer, vocab_size, list(eos_ids))
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_cache_tokens = max_cache_tokens
        self.long_prompt_chars = long_prompt_chars
        self.max_prompt_chars = max_prompt_chars
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._closed = False

    def close(self) -> None:
        """Stop the tokenizer thread (work running there finishes; work queued there ends with
        :class:`EngineClosedError`, as does any offloaded work asked for later)."""
        self._closed = True
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools = {}

    async def _offload(self, fn: Callable[..., T], *args, thread: str = "tokenizer") -> T:
        """Run ``fn`` in the engine's ``acb-tokenizer`` thread (or ``acb-grammar``: constraints compile there, so a
        slow one never holds up prompts), each started on first use."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        pool = self._pools.get(thread)
        if pool is None:
            pool = self._pools[thread] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"acb-{thread}")
        try:
            return await aio.wait_future(aio.current_loop(), pool.submit(lambda: fn(*args)))
        except concurrent.futures.CancelledError:  # close() dropped it from the thread's queue
            raise EngineClosedError("the engine closed before this request was admitted") from None

    # -- one request ----------------------------------------------------------------------------------------------

    def check_params(self, params: SamplingParams) -> SamplingParams:
        require_params(params)
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidSamplingParamsError(
                f"stop_token_ids {bad[:8]} outside the vocabulary (size {self.vocab_size})", param="stop_token_ids"
            )
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocab_size:  # sorted by token id
            raise InvalidSamplingParamsError(
                f"logit_bias token id {params.logit_bias[-1][0]} is outside the vocabulary (size {self.vocab_size})",
                param="logit_bias",
            )
        if params.n > 1 or params.best_of is not None and params.best_of > 1:
            raise InvalidSamplingParamsError(
                "n > 1 and best_of make several samples of one prompt: use engine.generate_choices() or "
                "engine.submit_choices()",
                param="n" if params.n > 1 else "best_of",
            )
        if params.top_k >= self.vocab_size:  # keeping the whole vocabulary is no filtering at all
            params = dataclasses.replace(params, top_k=0)
        return params

    async def stop_strings(self, params: SamplingParams) -> StopStrings | None:
        """The request's compiled stop strings (a large set compiles in the tokenizer thread)."""
        if not params.stop:
            return None
        if sum(map(len, params.stop)) <= _INLINE_STOP_CHARS:
            return compile_stops(params.stop)
        return await self._offload(compile_stops, params.stop)

    async def grammar(self, params: SamplingParams) -> Grammar | None:
        """A matcher for the request's output constraint, compiled (or found in the cache) in the grammar thread;
        a constraint that does not compile raises InvalidSamplingParamsError."""
        constraint = params.constraint
        if constraint is None:
            return None
        return await self._offload(self.grammars.matcher, *constraint, thread="grammar")

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt`` (a string, or token ids that are checked against the vocabulary)."""
        if isinstance(prompt, str):
            self.check_text(prompt, "prompt")
            try:
                if len(prompt) > self.long_prompt_chars:
                    ids = await self._offload(self.tokenizer.encode, prompt)
                else:
                    ids = self.tokenizer.encode(prompt)
            except EngineClosedError:
                raise
            except Exception as exc:  # a tokenizer bug: fail this request only
                raise RequestFailedError(f"tokenizing the prompt failed: {exc!r}") from exc
            ids = list(ids)
            if ids and max(ids) >= self.vocab_size:  # a tokenizer with tokens the model lacks: refused here, not
                # in a step (on CUDA an embedding lookup out of range is a device assert that ends every request)
                raise InvalidPromptError(
                    f"the tokenizer gave token id {max(ids)}, outside the model's vocabulary (size {self.vocab_size}):"
                    " the tokenizer does not match the model"
                )
        elif isinstance(prompt, SequenceABC) and not isinstance(prompt, (bytes, bytearray)):
            if len(prompt) >= self.max_model_len:  # before looking at every element of a huge list
                raise PromptTooLongError(
                    f"the prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len}, which leaves no "
                    "room for a new token"
                )
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise InvalidPromptError("a token-id prompt must be a list of ints")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                shown = f"{bad[:8]}{'...' if len(bad) > 8 else ''}"
                raise InvalidPromptError(f"token ids {shown} outside the vocabulary (size {self.vocab_size})")
        else:
            raise InvalidPromptError(f"a prompt is a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidPromptError("the prompt is empty (no tokens)")
        return ids

    def check_text(self, text: str, what: str) -> None:
        """Refuse text that is empty, longer than ``max_prompt_chars``, or not valid Unicode."""
        if not text:
            raise InvalidPromptError(f"the {what} is empty")
        self._check_size(len(text), what)
        _check_unicode(text, what)

    def _check_size(self, chars: int, what: str) -> None:
        if chars > self.max_prompt_chars:
            raise PromptTooLongError(
                f"the {what} has {chars} characters; at most {self.max_prompt_chars} are accepted "
                f"(EngineConfig.max_prompt_chars, by default 16 x max_model_len={self.max_model_len})"
            )

    async def render_chat(self, messages: list[dict]) -> str:
        """Render chat ``messages`` with the tokenizer's chat template, in the tokenizer thread. ``max_prompt_chars``
        bounds the rendered prompt, template text included (what is then submitted and checked again, so a chat
        that renders passes that check too); the contents alone are checked against it first, before rendering."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; use a plain completion")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError("messages must be a list of dicts", param="messages")
        texts = [t for m in messages for t in _texts(m.get("content"))]
        self._check_size(sum(map(len, texts)), "chat (its message contents alone, before the chat template adds text)")
        for t in texts:
            _check_unicode(t, "chat")
        try:
            render = functools.partial(self.tokenizer.apply_chat_template, tokenize=False, add_generation_prompt=True)
            prompt = await self._offload(render, messages)
        except EngineClosedError:
            raise
        except Exception as exc:
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}") from exc
        self._check_size(len(prompt), "chat prompt (rendered with the chat template, its text included)")
        return prompt

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt} tokens; max_model_len is {self.max_model_len}, which leaves no room "
                "for a new token"
            )
        # The whole sequence must fit in the cache on its own, or it could never finish, even alone.
        needed = min(num_prompt + params.max_new_tokens, self.max_model_len) - 1
        if needed > self.max_cache_tokens:
            raise PromptTooLongError(
                f"prompt ({num_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) needs {needed} KV slots; "
                f"the whole KV cache holds {self.max_cache_tokens}"
            )


def require_params(params: object) -> SamplingParams:
    """``params`` if it is a SamplingParams (which validated itself), else the typed error."""
    if not isinstance(params, SamplingParams):
        raise InvalidSamplingParamsError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params


def _texts(content) -> list[str]:
    """The strings in a chat message's content (a string, or OpenAI-style parts with ``text``)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def _check_unicode(text: str, what: str) -> None:
    """A lone surrogate cannot be encoded as UTF-8, so no tokenizer can take it: refuse it as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPromptError(
            f"the {what} is not valid Unicode text ({exc.reason} at character {exc.start})"
        ) from None


class AdmissionQueue:
    """Admitted requests waiting for a scheduler slot, and the submitters waiting for room in it (at most
    ``max_pending`` queue; submitters wait in line, first come first served).

    ``order`` (:attr:`acb.config.EngineConfig.admission_order`): which queued request :meth:`take` gives first, the
    oldest (``"arrival"``) or the one allowed the most output tokens (``"longest_first"``, ties oldest first).
    Items are the engine's request states (anything hashable with a ``queued`` flag and a ``seq`` with ``arrival``,
    ``max_len`` and ``num_prompt``); loop thread only. A removed request leaves its heap entry behind, skipped when
    it comes up.

    Room is handed out, not raced for: a place that comes free goes to the first submitter in line, which holds it
    (``_granted``) until it runs, so a newcomer cannot take it meanwhile; a submitter that leaves with a place passes
    it to the next in line."""

    def __init__(self, max_pending: int, order: str = "arrival") -> None:
        self.max_pending = max_pending
        self._longest_first = order == "longest_first"
        self._heap: list[tuple[int, int, int, object]] = []  # (key, arrival, put number, state)
        self._count = 0
        self._puts = 0
        self._blocked: dict[object, object] = {}  # state -> its waiter (aio.Loop.waiter), in line order
        self._granted: set = set()  # woken with a place held for them, not yet run

    @property
    def num_queued(self) -> int:
        return self._count

    @property
    def num_blocked(self) -> int:
        return len(self._blocked) + len(self._granted)

    async def wait_for_room(self, state, loop: aio.Loop, still_wanted: Callable[[], None]) -> None:
        """Wait until ``state`` may be queued (a place is held for it), or it was removed; ``still_wanted`` raises
        when the wait should end with an error (the engine closing). Returns at once when the queue has room and
        nobody waits before it."""
        if state.closed or (not self._blocked and self._count + len(self._granted) < self.max_pending):
            return
        self._blocked[state] = woken = loop.waiter()
        try:
            await woken
        except BaseException:
            self._blocked.pop(state, None)
            self._release(state)  # a place it was given goes to the next in line
            raise
        try:
            still_wanted()
        except BaseException:
            self._release(state)
            raise
        self._granted.discard(state)  # the caller queues it now (no await in between)

    def _release(self, state) -> None:
        if state in self._granted:
            self._granted.discard(state)
            self._wake()

    def put(self, state) -> None:
        state.queued = True
        seq = state.seq
        key = -(seq.max_len - seq.num_prompt) if self._longest_first else 0
        self._puts += 1
        heapq.heappush(self._heap, (key, seq.arrival, self._puts, state))
        self._count += 1

    def take(self, n: int) -> list:
        """Up to ``n`` requests for the scheduler, in the queue's order."""
        out = []
        heap = self._heap
        while n > 0 and heap:
            state = heapq.heappop(heap)[3]
            if not state.queued:
                continue  # removed while queued
            state.queued = False
            self._count -= 1
            out.append(state)
            n -= 1
        if out:
            self._wake()
        return out

    def remove(self, state) -> None:
        """``state`` ended (aborted, failed): out of the queue, or out of the line for room (its submitter wakes and
        sees it closed; a place held for it goes to the next in line)."""
        woken = self._blocked.pop(state, None)
        if woken is not None and not woken.done():
            woken.set_result(None)
        if state.queued:
            state.queued = False  # its heap entry is skipped by take(), or dropped here once they pile up
            self._count -= 1
            if len(self._heap) > 2 * self._count + 1024:
                self._heap = [e for e in self._heap if e[3].queued]
                heapq.heapify(self._heap)
            self._wake()
        self._release(state)

    def wake_all(self) -> None:
        """Wake every waiting submitter (the engine is closing: they see it and give up)."""
        while self._blocked:
            self._grant()

    def _wake(self) -> None:
        """Hand the free places to the first submitters in line."""
        while self._blocked and self._count + len(self._granted) < self.max_pending:
            self._grant()

    def _grant(self) -> None:
        state, woken = next(iter(self._blocked.items()))
        del self._blocked[state]
        self._granted.add(state)
        if not woken.done():
            woken.set_result(None)
