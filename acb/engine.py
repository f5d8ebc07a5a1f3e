"""The engine: wires the pipeline stages together and exposes the public API.

Pipeline (each stage a coroutine; queues between them)::

    stream()/generate()                                         per-request channel --> async for tok in ...
        | admission: validate, tokenize (thread if long)                ^
        v                                                                |
    [admitted queue] --> step loop --> [launched queue] --> completion loop --> [detok queue] --> detok loop
                                      schedule,                          await the step         detokenize,
                                      build batch,                       (bridge), accept       stop strings,
                                      launch (worker/GPU)                tokens, free blocks    deliver tokens

With ``overlap=True`` the step loop runs ahead of the completion loop (by ``overlap_depth - 1`` steps, one by
default): it schedules, prepares and launches step N+1 while step N computes, and N+1 reads N's sampled tokens from
the device token buffer. With ``overlap=False`` it waits for each step's tokens before preparing the next (the
synchronous baseline).
"""

from __future__ import annotations

import itertools
import logging

import torch

from . import aio, choices
from .admission import Admission, AdmissionQueue, Prompt, require_params
from .bridge import CompletionBridge
from .config import EngineConfig, SamplingParams
from .delivery import Delivery
from .detokenizer import text_decoder
from .errors import InvalidConfigError, InvalidRequestError
from .lifecycle import Lifecycle
from .loading import load_pretrained
from .model_setup import build_runtime, check_device, default_sampling, eos_ids, resolve_dtype
from .outputs import Completion, EngineStats
from .sequence import Sequence
from .stream import RequestState, RequestStream
from .tracing import Trace, Tracer

__all__ = ["Engine"]

log = logging.getLogger("acb")


class Engine(Lifecycle):
    """An asyncio continuous-batching engine around a transformers causal LM.

    While it runs, the engine owns the model: it switches the model's attention to acb's paged attention (run
    ``model.generate`` on another copy meanwhile). Closing it gives the model back as it was; an engine can be
    started again after it closed. Use it as ``async with engine:``; ``stream()``, ``submit()`` and ``generate()``
    may then be called from any number of tasks on that event loop.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config if config is not None else EngineConfig()
        self.tokenizer = tokenizer
        self.model = model
        self._eos_ids = eos_ids(model, tokenizer)
        self._build()
        self._delivery = Delivery(text_decoder(tokenizer))
        self.default_sampling = default_sampling(model)
        self.default_params = SamplingParams(**self.default_sampling)
        """What a request without parameters gets: the model's generation config where it sets temperature, top-p,
        top-k or max new tokens, acb's defaults (greedy, 256 tokens) for the rest. The CLI and the server fill what
        a request omits from it too. Make variants with ``dataclasses.replace(engine.default_params, ...)``."""
        self.tracer = Tracer()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._loop: aio.Loop | None = None
        self._tasks: list[aio.Task] = []
        self._link = _Link(self)

    def _build(self) -> None:
        """Take the model over and build what the stages run on (again when a closed engine starts anew)."""
        config = self.config
        rt = build_runtime(self.model, config)
        self._original_attention = rt.original_attention
        self.device, self.dtype, self.shape = rt.device, rt.dtype, rt.shape
        self.max_model_len, self.fast_path = rt.max_model_len, rt.fast_path
        self.path_reason = rt.path_reason
        """Which path the model runs (lean or generic) and why, in words; logged once at start."""
        self.startup = dict(rt.startup)
        """Seconds per start-up phase: ``lean_model_s``, ``runner_s`` (KV cache and CUDA graphs), ``warmup_s``
        (once ``start()`` ran its warm-up, see ``EngineConfig.warmup``; of it ``warmup_gemms_s`` and
        ``warmup_requests_s``, :mod:`acb.warmup`)."""
        self._blocks, self._scheduler = rt.blocks, rt.scheduler
        self._builder, self._runner = rt.builder, rt.runner
        self._bridge = CompletionBridge(self._runner.check_workers if self._runner.tp is not None else None)
        self._admission = Admission(
            self.tokenizer,
            vocab_size=rt.shape.vocab_size,
            max_model_len=self.max_model_len,
            max_cache_tokens=self._blocks.num_blocks * config.block_size,
            long_prompt_chars=config.long_prompt_chars,
            max_prompt_chars=config.max_prompt_chars or 16 * self.max_model_len,
            eos_ids=sorted(self._eos_ids),
        )
        self._live: dict[str, RequestState] = {}
        self._admitting: dict[str, bool] = {}  # request ids being validated and tokenized -> abort asked
        self._follows: dict[str, Sequence] = {}  # request id -> the sample it starts after (acb.choices)
        self._queue = AdmissionQueue(config.max_pending, config.admission_order)
        self._steps = 0
        self._state = "new"

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        **config_fields,
    ) -> Engine:
        """Load a transformers causal LM and its tokenizer (local directory or hub id) and wrap them. ``dtype``:
        ``"auto"`` (the checkpoint's; also ``None``), a name (``"bfloat16"``, ``"bf16"``, ...) or a ``torch.dtype``."""
        config = EngineConfig(device=device, **config_fields)
        if not isinstance(trust_remote_code, bool):  # "false" is truthy: it would run the checkpoint's code
            raise InvalidConfigError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        if dtype not in (None, "auto"):
            resolve_dtype(dtype)  # a bad one is refused before anything loads
        check_device(config.device, config.tensor_parallel_size)  # before loading the weights
        model, tokenizer = load_pretrained(path_or_id, dtype, trust_remote_code, config.tensor_parallel_size)
        return cls(model, tokenizer, config)

    # -- public API ---------------------------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        stream_interval: int = 1,
    ) -> RequestStream:
        """Generate for ``prompt`` (a string or token ids), yielding one :class:`Token` per generated token.

        ``stream_interval`` > 1 wakes the consumer only once that many tokens wait (the first token, and the last,
        come at once): fewer task switches for a consumer that does not need every token the moment it exists."""
        if not isinstance(stream_interval, int) or isinstance(stream_interval, bool) or stream_interval < 1:
            raise InvalidRequestError(
                f"stream_interval must be an integer >= 1, got {stream_interval!r}", param="stream_interval"
            )
        rid = request_id if request_id is not None else self._new_request_id()
        return RequestStream(self._link, prompt, params, rid, stream_interval)

    async def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        stream_interval: int = 1,
    ) -> RequestStream:
        """Validate and queue a request now, and return its stream: a bad request raises its typed error here,
        before anything is sent anywhere (``StreamingResponse(stream)`` in a web app then never starts a response
        that it cannot finish)."""
        return await self.stream(prompt, params, request_id=request_id, stream_interval=stream_interval).start()

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None
    ) -> Completion:
        """Generate for ``prompt`` and return the whole :class:`Completion`."""
        return await self.stream(prompt, params, request_id=request_id).collect()

    async def submit_choices(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        stream_interval: int = 1,
    ) -> list[RequestStream]:
        """``params.n`` samples of one prompt, each its own stream (request ids ``{request_id}-{i}``), all admitted
        before this returns. They share the prompt's KV blocks (:mod:`acb.choices`)."""
        self._check_loop()
        rid = request_id if request_id is not None else self._new_request_id()
        return await choices.submit_choices(self, prompt, self._params(params), rid, stream_interval)

    async def generate_choices(
        self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None
    ) -> list[Completion]:
        """``params.n`` whole completions of one prompt; with ``best_of``, the best ``n`` of that many samples by
        cumulative log-probability, best first."""
        self._check_loop()
        rid = request_id if request_id is not None else self._new_request_id()
        return await choices.generate_choices(self, prompt, self._params(params), rid)

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        return self.default_params if params is None else require_params(params)

    async def apply_chat_template(self, messages: list[dict]) -> str:
        """Render chat ``messages`` into a prompt with the tokenizer's chat template (in the engine's tokenizer
        thread). A rendered prompt longer than ``max_prompt_chars`` (template text included) is refused with
        ``PromptTooLongError``; so are contents longer than that in total, before rendering."""
        self._check_loop()
        return await self._admission.render_chat(messages)

    def abort(self, request_id: str) -> bool:
        """End a request now (its stream gets a final ``finish_reason="abort"`` marker) and free its KV blocks.

        Returns False if no live request has this id. Safe to call from any thread: off the engine's loop, the abort
        is handed to the loop and happens there shortly after.
        """
        if not isinstance(request_id, str):
            raise InvalidRequestError(f"request_id must be a string, got {type(request_id).__name__}")
        state = self._live.get(request_id)
        if state is None:
            if request_id in self._admitting:  # still being tokenized: it ends as soon as it exists
                self._admitting[request_id] = True
                return True
            return False
        self._abort_threadsafe(state)
        return True

    def clear_prefix_cache(self) -> int:
        """Drop every cached prefix: later requests compute their prompts in full until the cache fills again.
        Requests running now are not affected. Returns how many cached blocks were dropped."""
        return self._blocks.clear()

    def start_trace(self) -> None:
        """Start recording stage spans (and device step spans) for a timeline; see :mod:`acb.tracing`.

        On CUDA this needs ``record_step_timing=True`` and synchronizes the device once, to pin the GPU clock to
        the host clock."""
        self._runner.timer.start_trace()
        self.tracer.start()

    def stop_trace(self) -> Trace:
        """Stop recording; the trace holds host spans and the device's step spans on the host clock. Call after
        the traced work finished (it waits for the recorded CUDA events)."""
        trace = self.tracer.stop()
        trace.spans.extend(("device", s, e) for s, e in self._runner.timer.stop_trace())
        return trace

    def step_intervals(self) -> list[tuple[float, float]]:
        """GPU busy intervals ``(start_ms, end_ms)`` of every step so far, relative to the first step (CUDA, with
        ``record_step_timing=True``). Synchronizes on the recorded events: call it after a run, not in one."""
        return self._runner.timer.intervals()

    def step_shapes(self) -> list[tuple[int, int, bool]]:
        """Beside each of :meth:`step_intervals`: the (sub-)step's rows, tokens, and whether it replayed a decode
        CUDA graph (benchmarks split GPU time by kind of step with it)."""
        return self._runner.timer.shapes()

    def clear_step_timing(self) -> None:
        """Forget the step intervals recorded so far (a benchmark's warm-up)."""
        self._runner.timer.clear()

    def stats(self) -> EngineStats:
        """Where every live request is: each counted in exactly one of running, waiting and pending (a request
        that finished in the scheduler counts as running until its last token is delivered)."""
        waiting = len(self._scheduler.waiting) + self._queue.num_queued
        pending = self._queue.num_blocked
        return EngineStats(
            kv_blocks_total=self._blocks.num_blocks,
            kv_blocks_free=self._blocks.num_free,
            num_running=max(len(self._scheduler.running), len(self._live) - waiting - pending),
            num_waiting=waiting,
            num_pending=pending,
            prefix_queries=(p := self._blocks.stats).queries,
            prefix_hits=p.hits,
            prefix_queried_tokens=p.queried_tokens,
            prefix_cached_tokens=p.cached_tokens,
            prefix_evictions=p.evictions,
            prefix_cached_blocks=self._blocks.num_cached,
            num_preemptions=self._scheduler.num_preemptions,
            steps=self._steps,
        )

    # -- checks on the way in (admission itself, `_submit`, is the first stage: acb/stages.py) -----------------

    def _new_request_id(self) -> str:
        return f"req-{next(self._ids)}"


class _Link:
    """The engine as its streams see it (:class:`acb.stream.EngineLink`): admission, abort, the loop check."""

    __slots__ = ("_engine",)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def loop(self) -> aio.Loop | None:
        return self._engine._loop

    def check_loop(self) -> None:
        self._engine._check_loop()

    async def submit(self, request_id, prompt, params, attach, stream_interval) -> RequestState:
        return await self._engine._submit(request_id, prompt, params, attach, stream_interval)

    def abort(self, state: RequestState) -> None:
        self._engine._abort_threadsafe(state)
