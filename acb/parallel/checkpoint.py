"""A rank's shard read from the checkpoint's safetensors files, in the rank's own process, a layer at a time: no
process ever holds the whole model (a 70B checkpoint needs neither one GPU nor one host's memory for all of it).

The model is built on the ``meta`` device from its config; its top-level tensors (embedding, final norm, LM head)
are read first, then each decoder layer in turn: read, mapped by the family's adapter as usual, cut to this rank's
shard (:func:`~acb.parallel.shard.shard_layer`), and let go. The adapter runs on a model whose other layers are
still on the meta device, where its work costs nothing.
"""

from __future__ import annotations

import copy
import json
import os
import re

import torch

from ..families import LeanSpec, adapter
from .shard import shard_layer, shard_spec

__all__ = ["has_checkpoint", "read_shard"]


def has_checkpoint(path: str) -> bool:
    """Whether ``path`` is a local directory with safetensors weights."""
    return os.path.isfile(os.path.join(path, "model.safetensors")) or os.path.isfile(
        os.path.join(path, "model.safetensors.index.json")
    )


def _files(path: str) -> dict[str, str]:
    """Tensor name -> the file that holds it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    single = os.path.join(path, "model.safetensors")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


@torch.no_grad()
def read_shard(
    path: str, config, dtype: torch.dtype, family: str, rank: int, world: int, max_positions: int
) -> LeanSpec:
    """Rank ``rank``'s shard of the checkpoint at ``path`` (host memory), for a model of ``config``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)  # rank 0's names acb's attention, which a worker's transformers does not know
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    where = _files(path)
    handles: dict[str, object] = {}

    def load(names: list[str]) -> None:
        state = {}
        for name in names:
            file = where.get(name)
            if file is None:
                continue  # a tied weight the checkpoint stores once
            if file not in handles:
                handles[file] = safe_open(file, "pt")
            state[name] = handles[file].get_tensor(name).to(dtype)
        model.load_state_dict(state, strict=False, assign=True)

    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    in_layer = re.compile(r"\.layers\.(\d+)\.")
    load([n for n in names if not in_layer.search(n)])
    model.tie_weights()
    lean_spec = adapter(family).lean_spec
    layers = []
    for i, block in enumerate(model.model.layers):
        load([n for n in names if f".layers.{i}." in n])
        spec = lean_spec(model)
        layers.append(shard_layer(spec, spec.layers[i], rank, world))
        block.to("meta")  # this layer's whole weights: let go
    return shard_spec(lean_spec(model), rank, world, max_positions, layers=layers)
