"""The lean model path for the Llama / Qwen2 / Qwen3 families: fewer, fatter kernels per step.

Built from an already-loaded transformers model, sharing its weights: Q/K/V and gate/up projections are fused into
single GEMMs (the model's own projection weights become views into the fused ones, so the model keeps working and
nothing is stored twice), residual add + RMSNorm is one kernel, SiLU·mul is one kernel, and rotary embedding is
applied inside the KV-cache write. Attention runs on the paged Triton kernels. On the CPU (tests) the same
forward runs on plain torch ops and the reference attention, so its logic is checked against ``model.generate``
without a GPU. Any other transformers model keeps running through the generic path (transformers' own modules with
acb's attention function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention_reference
from .kv_cache import KVCache

__all__ = ["LeanCausalLM", "LeanInputs", "supports_lean"]

_FAMILIES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}


def supports_lean(model) -> bool:
    """Whether ``model`` is a family the lean path implements (and uses no feature it lacks)."""
    cfg = model.config
    if type(model).__name__ not in _FAMILIES:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return False
    # Sliding-window attention (Qwen2 with use_sliding_window, Mistral checkpoints that set a window) is not
    # wired into the lean path yet.
    windowed = getattr(cfg, "use_sliding_window", False) or (
        "Mistral" in type(model).__name__ and getattr(cfg, "sliding_window", None)
    )
    if windowed:
        return False
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) in ("default", "llama3", "linear")


@dataclass(slots=True)
class LeanInputs:
    """Device tensors of one step for the lean forward (the CUDA-graph runner keeps static copies of these)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    seq_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    query_start_loc: torch.Tensor  # [B + 1]
    max_query_len: int
    logits_idx: torch.Tensor | None  # [S] rows whose logits are needed (None: all)
    decode_splits: int = 0  # > 0: every sequence has one query token; use the split decode kernel
    meta: AttentionMetadata | None = None  # host-side layout, for the reference attention on the CPU


class _Layer:
    __slots__ = ("ln1", "qkv_w", "qkv_b", "q_norm", "k_norm", "o_w", "ln2", "gate_up_w", "down_w")


class LeanCausalLM:
    def __init__(self, model, max_positions: int, workspace_rows: int = 0) -> None:
        cfg = model.config
        inner = model.model
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.kv_cache: KVCache | None = None  # set by the engine once the cache is sized
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        self.on_cuda = self.device.type == "cuda"
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                lw = _Layer()
                lw.ln1 = layer.input_layernorm.weight
                lw.ln2 = layer.post_attention_layernorm.weight
                lw.qkv_w = _fuse(a.q_proj, a.k_proj, a.v_proj)
                lw.qkv_b = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                lw.q_norm = a.q_norm.weight if hasattr(a, "q_norm") else None
                lw.k_norm = a.k_norm.weight if hasattr(a, "k_norm") else None
                lw.o_w = a.o_proj.weight
                lw.gate_up_w = _fuse(m.gate_proj, m.up_proj)
                lw.down_w = m.down_proj.weight
                self.layers.append(lw)
        self._rotary = inner.rotary_emb
        self._rotary_tables(max_positions)
        q_rows = self.num_heads * self.head_dim
        self._q_size, self._kv_size = q_rows, self.num_kv_heads * self.head_dim
        self.workspace = None
        if self.on_cuda and workspace_rows:
            self.workspace = _decode_workspace(workspace_rows, self.num_heads, self.head_dim, self.device)
        if self.on_cuda:
            from .kernels import attention as kattn
            from .kernels import fused

            self._k, self._kf = kattn, fused

    def ensure(self, max_positions: int, workspace_rows: int) -> None:
        """Grow the rotary tables and the decode workspace for an engine of that geometry."""
        if self.cos.shape[0] < max_positions:
            self._rotary_tables(max_positions)
        if self.workspace is not None and self.workspace[0].shape[0] < workspace_rows:
            self.workspace = _decode_workspace(workspace_rows, self.num_heads, self.head_dim, self.device)

    @torch.no_grad()
    def _rotary_tables(self, max_positions: int) -> None:
        """cos/sin of every position from the model's own rotary module (rope scaling included), first halves."""
        pos = torch.arange(max_positions, device=self.device)[None]
        cos, sin = self._rotary(torch.zeros(1, dtype=torch.float32, device=self.device), pos)
        self.cos = cos[0, :, : self.head_dim // 2].float().contiguous()
        self.sin = sin[0, :, : self.head_dim // 2].float().contiguous()

    # -- the forward ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, x: LeanInputs) -> torch.Tensor:
        """Logits ``[S, vocab]`` (model dtype) for the rows ``x.logits_idx``."""
        h = F.embedding(x.input_ids, self.embed)
        residual = None
        for i, lw in enumerate(self.layers):
            if residual is None:
                residual = h.clone()
                normed = self._rmsnorm(h, None, lw.ln1)
            else:
                normed = self._rmsnorm(h, residual, lw.ln1)
            attn = self._attention(i, lw, normed, x)
            normed = self._rmsnorm(attn, residual, lw.ln2)
            h = F.linear(self._silu_mul(F.linear(normed, lw.gate_up_w)), lw.down_w)
        if x.logits_idx is not None:
            h, residual = h[x.logits_idx], residual[x.logits_idx]
        return F.linear(self._rmsnorm(h, residual, self.norm), self.lm_head)

    def _attention(self, i: int, lw: _Layer, normed: torch.Tensor, x: LeanInputs) -> torch.Tensor:
        t = normed.shape[0]
        qkv = F.linear(normed, lw.qkv_w, lw.qkv_b)
        q = qkv[:, : self._q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self._q_size : self._q_size + self._kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self._q_size + self._kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if lw.q_norm is not None:  # Qwen3: RMSNorm over each head before rotary
            q = self._rmsnorm(q.reshape(-1, self.head_dim), None, lw.q_norm).view(t, self.num_heads, self.head_dim)
            k = self._rmsnorm(k.reshape(-1, self.head_dim), None, lw.k_norm).view(t, self.num_kv_heads, self.head_dim)
        kv = self.kv_cache.layers[i]
        if self.on_cuda:
            self._kf.rope_and_cache(q, k, v, self.cos, self.sin, x.positions, x.slot_mapping, kv)
            if x.decode_splits:
                out = self._k.paged_decode(
                    q, kv, x.block_tables, x.seq_lens, self.scale, x.decode_splits, workspace=self.workspace
                )
            else:
                out = self._k.paged_prefill(
                    q, kv, x.block_tables, x.seq_lens, x.query_start_loc, x.max_query_len, self.scale
                )
        else:
            q, k = _rope(q, self.cos, self.sin, x.positions), _rope(k, self.cos, self.sin, x.positions)
            self.kv_cache.write(i, k, v, x.slot_mapping)
            out = paged_attention_reference(q, kv, x.meta, self.scale)
        return F.linear(out.reshape(t, -1), lw.o_w)

    # -- fused ops, with plain torch twins for the CPU ---------------------------------------------------------------

    def _rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return self._kf.add_rmsnorm(x, residual, w, self.eps)
        if residual is not None:
            residual.add_(x)
            x = residual
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.on_cuda:
            return self._kf.silu_mul(gate_up)
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g) * u


def _fuse(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several projections of the same input, concatenated by output rows; each projection's own
    weight becomes a view into it, so the model keeps working as it was and the fusion costs no memory."""
    fused = torch.cat([m.weight.detach() for m in linears], dim=0)
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[row : row + rows], requires_grad=False)
        row += rows
    return fused


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    c = torch.cat([cos[positions], cos[positions]], -1)[:, None, :].to(x.dtype)
    s = torch.cat([sin[positions], sin[positions]], -1)[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s


def _decode_workspace(rows: int, heads: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    splits = 32
    op = torch.empty(rows, heads, splits, dim, dtype=torch.float32, device=device)
    mp = torch.empty(rows, heads, splits, dtype=torch.float32, device=device)
    return op, mp, torch.empty_like(mp)
