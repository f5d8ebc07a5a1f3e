"""Reading a checkpoint: ``Engine.from_pretrained``'s model and tokenizer, from a local directory or a hub id, with
the loaders' own errors as one typed :class:`~acb.errors.ModelLoadError`."""

from __future__ import annotations

import torch

from .errors import AcbError, ModelLoadError
from .model_setup import resolve_dtype
from .parallel.checkpoint import has_checkpoint

__all__ = ["load_pretrained"]


def load_pretrained(
    path_or_id: str,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
):
    """``(model, tokenizer)`` from a local directory or a hub id (blocking: loads the weights). For more than one
    tensor-parallel rank, a local directory with safetensors files is not loaded: the model is built on the ``meta``
    device and remembers the directory, so that every rank reads its own shard from the files (none holds the whole
    model)."""
    import os

    if path_or_id.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path_or_id)):
        raise ModelLoadError(f"no model directory at {path_or_id!r}")
    try:
        return _load(path_or_id, dtype, trust_remote_code, tensor_parallel_size)
    except AcbError:
        raise
    except Exception as exc:  # transformers', tokenizers' and safetensors' own errors, each of its kind
        raise ModelLoadError(f"could not load {path_or_id!r}: {type(exc).__name__}: {exc}") from exc


def _load(path_or_id: str, dtype, trust_remote_code: bool, tensor_parallel_size: int):
    import os

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    if tensor_parallel_size > 1 and has_checkpoint(os.path.expanduser(path_or_id)):
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        wanted = getattr(config, "dtype", None) if dtype is None or dtype == "auto" else dtype
        model.to(resolve_dtype(wanted) if wanted is not None else torch.float32)
        try:
            model.generation_config = GenerationConfig.from_pretrained(path_or_id)
        except OSError:
            pass  # none in the directory: the config's own
        model._acb_checkpoint = os.path.abspath(os.path.expanduser(path_or_id))
        return model, tokenizer
    torch_dtype = "auto" if dtype is None or dtype == "auto" else resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer
