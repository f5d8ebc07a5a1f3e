"""Preparing a model for the engine: device and dtype, the attention implementation, the lean path and its CUDA
graphs, KV-cache sizing; and what the engine reads from the checkpoint (EOS ids, default sampling).

Runs once, in ``Engine.__init__``, before any event loop work.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import weakref
from dataclasses import dataclass

import torch

from . import attention
from .batch import BatchBuilder
from .block_manager import BlockManager
from .config import EngineConfig
from .cuda_graphs import graph_rows
from .errors import InvalidConfigError, ModelInUseError
from .families import adapter, lean_plan
from .kernels import check_environment, pdl_words
from .kernels.projection import MAX_ROWS
from .kv_cache import KVCache, ModelShape, auto_num_blocks
from .lean_model import LeanCausalLM
from .parallel.checkpoint import read_shard
from .parallel.shard import check_divisible, materialize, shard_spec
from .parallel.workers import Geometry, TensorParallel
from .runner import ModelRunner
from .scheduler import Scheduler

__all__ = [
    "Runtime",
    "build_runtime",
    "check_device",
    "resolve_max_model_len",
    "release_model",
    "eos_ids",
    "default_sampling",
    "resolve_dtype",
    "DTYPES",
]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(slots=True)
class Runtime:
    """Everything the engine's stages run on, built for one model and config."""

    device: torch.device
    dtype: torch.dtype
    shape: ModelShape
    max_model_len: int
    fast_path: bool
    path_reason: str
    """Why the model got the lean path or the generic one (logged once at start)."""
    blocks: BlockManager
    scheduler: Scheduler
    builder: BatchBuilder
    runner: ModelRunner
    original_attention: str | None
    """The model's attention implementation before the engine took it over (restored by :func:`release_model`)."""
    startup: dict[str, float]
    """Seconds spent per start-up phase: ``lean_model_s`` (fusing the weights), ``runner_s`` (KV cache, CUDA
    graphs)."""


def build_runtime(model: torch.nn.Module, config: EngineConfig) -> Runtime:
    world = config.tensor_parallel_size
    check_environment()  # ACB_PDL and ACB_SPLIT_PROJECTIONS, whatever the device
    check_device(config.device, world)  # before the model is moved there (model.to("meta") would drop its weights)
    max_model_len = resolve_max_model_len(model.config, config.max_model_len)
    if config.device is None and world == 1:
        held = next(model.parameters()).device
        if held.type not in ("cpu", "cuda"):
            raise InvalidConfigError(
                f"the model is on {held}, where acb does not run (the CPU and CUDA GPUs): move it there (a meta model "
                "holds no weights: load them) or give EngineConfig(device=...)"
            )
    if world > 1:  # sharded where it lies (host memory, or meta): each rank moves only its shard to its GPU
        if config.dtype is not None:
            model.to(dtype=resolve_dtype(config.dtype))
        device = _parallel_device(model, config.device)
    else:
        if config.device is not None or config.dtype is not None:
            model.to(device=config.device, dtype=resolve_dtype(config.dtype) if config.dtype else None)
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    attention.register()
    original_attention = _claim(model)
    try:
        return _build_runtime(model, config, world, device, dtype, max_model_len, original_attention)
    except BaseException as exc:  # a refused configuration leaves the user's model as it found it (generate works)
        release_model(model, original_attention)
        if _out_of_memory(exc):  # sizes the memory cannot hold: the configuration's error, not a crash
            raise InvalidConfigError(
                f"the engine's buffers do not fit in {device.type} memory ({type(exc).__name__}: "
                f"{(str(exc).splitlines() or [''])[0][:200]}); lower num_kv_blocks, block_size, max_num_seqs, "
                "max_num_batched_tokens or max_model_len"
            ) from exc
        raise


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: torch's (CUDA, and the CPU allocator's RuntimeError) or Python's."""
    oom = isinstance(exc, (MemoryError, torch.OutOfMemoryError))
    return oom or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _build_runtime(
    model: torch.nn.Module,
    config: EngineConfig,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    original_attention: str | None,
) -> Runtime:
    model.eval()
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION)

    shape = ModelShape.from_config(model.config)
    lean = None
    use_lean = config.fast_path if config.fast_path is not None else device.type == "cuda"
    family, plan = lean_plan(model)
    why = plan
    if family is None:
        why = f"generic path: {why}"
    elif use_lean:
        why = f"lean path: {why}"
    else:
        why = "generic path: fast_path=False" if config.fast_path is False else "generic path: the CPU default"
    startup = {"lean_model_s": 0.0}
    t0 = time.perf_counter()
    if world > 1:
        if family is None:
            raise InvalidConfigError(
                f"tensor_parallel_size={world} needs the lean path, which this model lacks ({why})"
            )
        if config.fast_path is False:
            raise InvalidConfigError(f"tensor_parallel_size={world} needs the lean path; fast_path=False turns it off")
        use_lean = True
        why = f"lean path: {plan}; tensor parallel over {world} processes"
    if use_lean and family is not None and world > 1:
        lean = _cached_lean(model, dtype)  # an earlier engine's fused weights, if any
        spec = lean.spec if lean is not None else adapter(family).lean_spec(model)
        lean = None
        check_divisible(spec, world)
        checkpoint = getattr(model, "_acb_checkpoint", None)
        if checkpoint is not None:  # every rank reads its own shard from the files (a meta model here)
            shards = [read_shard(checkpoint, model.config, dtype, family, 0, world, max_model_len)]
            shards += [None] * (world - 1)
        else:
            shards = [shard_spec(spec, r, world, max_model_len) for r in range(world)]
        shards[0] = materialize(shards[0], device, seed=0)  # the others move (or are made) in their workers
    elif use_lean and family is not None:
        # The lean model owns the fused weights; a later engine on the same model reuses it, once the engine
        # before it closed (they would share its KV cache and workspace).
        lean = _cached_lean(model, dtype, device)
        if lean is None:
            lean = LeanCausalLM(model, family, max_model_len, workspace_rows=config.max_num_seqs)
            model._acb_lean = lean
        else:  # each engine reads ACB_SPLIT_PROJECTIONS anew
            lean.use_split_projections(lean.kernels)
        lean.ensure(max_model_len, config.max_num_seqs)
    elif config.fast_path:
        raise InvalidConfigError(f"fast_path=True, but the lean model path does not take this model ({why})")
    graphs = config.cuda_graphs and device.type == "cuda"
    startup["lean_model_s"] = time.perf_counter() - t0

    if world > 1:  # each rank caches its share of the KV heads
        shape = dataclasses.replace(shape, num_kv_heads=shape.num_kv_heads // world)
    # Sized after the lean model was built (its rotary tables and workspace take memory too).
    num_blocks = config.num_kv_blocks or auto_num_blocks(
        shape,
        config.block_size,
        dtype,
        device,
        config.kv_memory_fraction,
        wanted_tokens=config.max_num_seqs * max_model_len,
    )
    blocks = BlockManager(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
    max_blocks = blocks.blocks_for(max_model_len)
    # One extra block, owned by no sequence: padding rows (CUDA graphs, finished rows of a round) write their KV there.
    kv_cache = KVCache(shape, num_blocks + 1, config.block_size, dtype, device)
    tp = None
    if world > 1:
        tp = TensorParallel(world, device)
        vocab = spec.lm_head.shape[0]  # the LM head's rows (what sampling and penalties size by), not the config's
        geometry = Geometry(family=family, vocab_size=vocab, shape=shape, dtype=dtype,
                            num_blocks=num_blocks + 1, block_size=config.block_size,
                            max_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
                            max_rows=config.max_num_seqs, max_blocks=max_blocks, max_positions=max_model_len,
                            device_type=device.type, device_index=device.index or 0,
                            graph_rows=graph_rows(config.max_num_seqs) if graphs else 0,
                            checkpoint=checkpoint, config=model.config if checkpoint is not None else None,
                            threads=max(1, torch.get_num_threads() // world))  # fmt: skip
        group = tp.start(shards, geometry)
        lean = LeanCausalLM(model, family, max_model_len, config.max_num_seqs, spec=shards[0], group=group,
                            vocab_size=vocab)  # fmt: skip
    if lean is not None:
        lean.kv_cache = kv_cache
    t0 = time.perf_counter()
    runner = ModelRunner(
        model,
        kv_cache,
        device,
        max_num_seqs=config.max_num_seqs,
        max_tokens=config.max_num_batched_tokens,
        max_blocks=max_blocks,
        block_size=config.block_size,
        max_model_len=max_model_len,
        lean=lean,
        graphs=graphs,
        mixed_graphs=config.mixed_graphs,
        record_timing=config.record_step_timing,
        tp=tp,
    )
    startup["runner_s"] = time.perf_counter() - t0
    log = logging.getLogger("acb")
    mixed = 0 if runner.mixed is None else sum(len(b.graphs) + len(b.heads) for b in runner.mixed.buckets)
    log.info("acb start-up: lean model %.2f s, KV cache, %d decode graphs and %d mixed-step graphs %.2f s",
             startup["lean_model_s"], 0 if runner.graphs is None else len(runner.graphs.graphs), mixed,
             startup["runner_s"])  # fmt: skip
    if runner.graph_blocker is not None:
        why += f"; decode steps run eagerly: {runner.graph_blocker}"
    if lean is not None and lean.on_cuda and world == 1:  # the decode steps' output and down projections
        how = "split-K kernel" if lean.split_reason is None else f"cuBLAS ({lean.split_reason})"
        why += f"; output and down projections of steps up to {MAX_ROWS} rows: {how}"
        why += "; " + pdl_words(lean.pdl, lean.pdl_reason)
    elif runner.generic is not None and runner.generic.kernels is not None:  # its norms, gate/up, rotary, attention
        why += "; " + pdl_words(runner.generic.pdl, runner.generic.pdl_reason)
    model._acb_owner = weakref.ref(runner)
    return Runtime(
        device=device,
        dtype=dtype,
        shape=shape,
        max_model_len=max_model_len,
        fast_path=lean is not None,
        path_reason=why,
        blocks=blocks,
        scheduler=Scheduler(
            blocks,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            admission_group=config.admission_group or max(1, config.max_num_seqs // 8),
            admission_max_delay=config.admission_max_delay,
            decode_steps=config.decode_steps,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
        ),
        builder=BatchBuilder(config.max_num_seqs, config.block_size),
        runner=runner,
        original_attention=original_attention,
        startup=startup,
    )


def resolve_max_model_len(model_config, wanted: int | None) -> int:
    """``EngineConfig.max_model_len`` for this model: ``None`` takes the model's ``max_position_embeddings`` (4096
    where its config has none); an explicit value past the positions the model has is refused. Those are
    ``max_position_embeddings``, or as vLLM derives them for rotary scaling that extends the context (``linear``,
    ``dynamic``: times its factor; ``yarn``: ``original_max_position_embeddings`` times its factor)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    own = getattr(text, "max_position_embeddings", None)
    if not isinstance(own, int) or own < 1:
        return wanted or 4096
    if wanted is None or wanted <= own:
        return wanted or own
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    factor = rope.get("factor") if kind in ("linear", "dynamic", "yarn") else None
    if isinstance(factor, int | float) and factor > 1:
        base = (rope.get("original_max_position_embeddings") if kind == "yarn" else None) or own
        if wanted <= int(base * factor):
            return wanted
        raise InvalidConfigError(
            f"max_model_len={wanted} is more than the {int(base * factor)} positions this model takes "
            f"({base} x its {kind} rotary scaling factor {factor:g}); give at most {int(base * factor)}"
        )
    if rope is None and not any(hasattr(text, a) for a in ("rope_theta", "rotary_dim", "rotary_pct")):
        raise InvalidConfigError(
            f"max_model_len={wanted} is more than this model's {own} positions (max_position_embeddings): its "
            f"position embeddings are a learned table with no row past {own - 1}; give at most {own} (None: {own})"
        )
    raise InvalidConfigError(
        f"max_model_len={wanted} is more than the {own} positions this model was trained for "
        f"(max_position_embeddings): rotary positions past them give unreliable output; give at most {own} "
        "(None: that), or extend the model's context with rotary scaling in its config (rope_parameters) first"
    )


def check_device(device: str | None, world: int = 1) -> None:
    """Refuse ``EngineConfig.device`` (already ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, see :class:`EngineConfig`) if
    this machine lacks that GPU (or, under tensor parallelism, the ``world - 1`` after it)."""
    if device is None or not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    first = int(device.partition(":")[2] or 0)
    if first + world > count:
        have = f"{count} CUDA devices (cuda:0 to cuda:{count - 1})" if count else "no CUDA device"
        need = f"cuda:{first} to cuda:{first + world - 1} (tensor_parallel_size={world})" if world > 1 else device
        raise InvalidConfigError(f"device={device!r} needs {need}; this machine has {have}")


def _parallel_device(model, wanted: str | None) -> torch.device:
    """Rank 0's device under tensor parallelism (ranks 1.. take the next ones): ``EngineConfig.device``, else the
    model's own, else (a model on the CPU or the meta device) the first GPU if there is one."""
    if wanted is not None:
        device = torch.device(wanted)
    else:
        device = next(model.parameters()).device
        if device.type in ("cpu", "meta"):
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise InvalidConfigError(f"tensor parallelism runs on CUDA or on the CPU, not on {device}")
    return device


def _cached_lean(model, dtype: torch.dtype, device: torch.device | None = None) -> LeanCausalLM | None:
    """An earlier engine's lean model on ``model`` (its fused weights), if they still have the model's dtype (and
    ``device``). Moving or casting the model since (``model.to``, ``EngineConfig(dtype=...)``) gave the model new
    weights and left those stale: they are dropped, and the caller fuses the model's current ones."""
    lean = getattr(model, "_acb_lean", None)
    if lean is not None and (lean.dtype != dtype or (device is not None and lean.device != device)):
        model._acb_lean = lean = None
    return lean


def _claim(model) -> str | None:
    """Make sure no open engine still uses ``model``; drop what a closed or discarded one left on it. Returns the
    model's own attention implementation (to give back when the engine closes)."""
    ref = getattr(model, "_acb_owner", None)
    owner = ref() if ref is not None else None
    if owner is not None and not owner.closed:
        owner = None  # hold no reference while the collector runs
        gc.collect()  # an engine dropped without close() may only be waiting for the cycle collector
        owner = ref()
    if owner is not None and not owner.closed:
        raise ModelInUseError(
            "another open Engine serves this model: close it first (`await engine.close()`, or leave its "
            "`async with`), or build this engine on a separate model"
        )
    lean = getattr(model, "_acb_lean", None)
    if lean is not None:
        lean.kv_cache = None  # a discarded engine's cache: free it before this engine sizes its own
    current = getattr(model.config, "_attn_implementation", None)
    if current == attention.ATTN_IMPLEMENTATION:  # a discarded engine never gave it back
        return getattr(model, "_acb_original_attention", None)
    model._acb_original_attention = current
    return current


def release_model(model, original_attention: str | None) -> None:
    """Give the model back as it was before the engine: its own attention, so ``model.generate`` works again. (The
    lean path's fused weights stay: the model's projections are views into them.)"""
    if original_attention is not None and original_attention != attention.ATTN_IMPLEMENTATION:
        model.set_attn_implementation(original_attention)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype`` from what users write: ``torch.bfloat16``, ``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"``."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key in DTYPES:
            return DTYPES[key]
    raise InvalidConfigError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")


def default_sampling(model) -> dict[str, float | int]:
    """What the checkpoint's generation config sets explicitly among temperature, top-p, top-k and max new tokens
    (the defaults of a request that omits them; ``do_sample=False`` means greedy). Values acb would refuse are
    left out, with a warning."""
    from .config import SamplingParams
    from .errors import InvalidSamplingParamsError

    gen = getattr(model, "generation_config", None)
    if gen is None:
        return {}
    diff = gen.to_diff_dict()
    keys = ("temperature", "top_p", "top_k", "max_new_tokens")
    out: dict[str, float | int] = {k: diff[k] for k in keys if diff.get(k) is not None}
    if diff.get("do_sample") is False:
        out["temperature"] = 0.0
    for key in list(out):
        try:
            SamplingParams(**{key: out[key]})
        except InvalidSamplingParamsError as exc:
            logging.getLogger("acb").warning("ignoring the generation config's %s: %s", key, exc)
            del out[key]
    return out


def eos_ids(model, tokenizer) -> frozenset[int]:
    """EOS token ids from the generation config (or model config) and the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
