"""The paged KV cache: one tensor per layer holding keys and values by block, and its sizing.

Layout per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V). A token at position ``p`` of a
sequence with block table ``bt`` lives at flat slot ``bt[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import InvalidConfigError

__all__ = ["ModelShape", "KVCache", "auto_num_blocks"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The attention geometry of a transformers causal LM, read from its config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class KVCache:
    """Paged K/V storage for every layer, plus the write of a step's new keys and values."""

    def __init__(
        self, shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = [
            torch.zeros(2, num_blocks, block_size, shape.num_kv_heads, shape.head_dim, dtype=dtype, device=device)
            for _ in range(shape.num_layers)
        ]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store ``key``/``value`` (``[tokens, kv_heads, head_dim]``) at their flat slots."""
        kv = self.layers[layer]
        flat = kv.view(2, -1, kv.shape[-2], kv.shape[-1])
        flat[0].index_copy_(0, slot_mapping, key.to(kv.dtype))
        flat[1].index_copy_(0, slot_mapping, value.to(kv.dtype))


def auto_num_blocks(
    shape: ModelShape,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    fraction: float,
    wanted_tokens: int,
) -> int:
    """Blocks that fit in ``fraction`` of free memory, never more than ``wanted_tokens`` need.

    On CUDA the free memory is what the driver reports after the weights are loaded, plus what PyTorch's caching
    allocator holds without using (a previous engine's freed cache, say); on the CPU it is the available RAM, of
    which the cache takes at most a quarter (the host has other work to do).
    """
    per_block = shape.kv_bytes_per_token(dtype) * block_size
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(free * fraction)
    else:
        budget = int(_available_ram() * min(fraction, 0.25))
    if budget < per_block:
        raise InvalidConfigError(
            f"one KV block ({block_size} tokens, {per_block:,} bytes) is larger than the {budget:,} bytes the cache "
            f"may take on {device.type}: lower block_size, or give num_kv_blocks"
        )
    return int(min(budget // per_block, -(-wanted_tokens // block_size)))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
