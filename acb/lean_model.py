"""The lean model path: fewer, fatter kernels per step, for every family with an adapter (:mod:`acb.families`).

Built from an already-loaded transformers model, sharing its weights: Q/K/V and gate/up projections are fused into
single GEMMs (the model's own projection weights become views into the fused ones, so the model keeps working and
nothing is stored twice), residual add + RMSNorm is one kernel, SiLU·mul is one kernel, and rotary embedding is applied
inside the decode attention kernel (decode steps) or the KV-cache write (steps with prompts). Attention runs on the
paged Triton kernels (sliding windows per layer). On the CPU (tests) the same forward runs on plain torch ops and the
reference attention, so its logic is checked against ``model.generate`` without a GPU. The CPU or CUDA implementation of
each op is chosen once, when the model is built. Any model without an adapter keeps running through the generic path
(transformers' own modules with acb's attention function).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention_reference
from .families import LeanLayer, LeanSpec, adapter
from .kernels import pdl_choice
from .kv_cache import KVCache

__all__ = ["LeanCausalLM", "LeanInputs"]


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
    prefill_map: torch.Tensor | None = None  # the prefill kernel's programs, made by the step's first layer


# Eagerly run steps on CUDA pad their tokens to a multiple of this (LeanCausalLM.forward): the row counts their
# GEMMs meet are then few enough for the warm-up to run each once (LeanCausalLM.warm_gemms).
EAGER_TOKEN_MULTIPLE = 16
# Steps of more tokens than this pad to a multiple of LARGE_STEP_MULTIPLE instead: cuBLAS computes whole 128-row tiles
# anyway, and the warm-up, whose GEMM work grows with the square of the step budget, runs 8x fewer counts there.
LARGE_STEP, LARGE_STEP_MULTIPLE = 8192, 128


def padded_tokens(tokens: int, multiple: int) -> int:
    """The token count a step of ``tokens`` runs its row-wise ops at, padding to ``multiple`` (1: none), or to
    :data:`LARGE_STEP_MULTIPLE` past :data:`LARGE_STEP` tokens."""
    if multiple > 1 and tokens > LARGE_STEP:
        multiple = max(multiple, LARGE_STEP_MULTIPLE)
    return -(-tokens // multiple) * multiple


def pad_rows(rows: torch.Tensor, buckets: list[int]) -> torch.Tensor:
    """``rows`` and copies of its first entry, up to the smallest bucket that holds them (``rows`` itself when it
    fills one, or no bucket does)."""
    n = rows.shape[0]
    size = next((b for b in buckets if b >= n), n)
    return rows if size == n or n == 0 else torch.cat((rows, rows[:1].expand(size - n)))


class LeanCausalLM:
    def __init__(
        self,
        model,
        family: str,
        max_positions: int,
        workspace_rows: int = 0,
        *,
        spec: LeanSpec | None = None,
        group=None,
        vocab_size: int | None = None,
    ) -> None:
        """``family``: the adapter module that :func:`acb.families.lean_plan` chose for ``model``.

        Tensor parallelism (:mod:`acb.parallel`): ``spec`` is this rank's shard (``model`` may then be None),
        ``group`` its :class:`~acb.parallel.Group`, ``vocab_size`` the whole vocabulary's size."""
        spec = spec if spec is not None else adapter(family).lean_spec(model)
        self.spec = spec
        self.group = group
        self.vocab_size = vocab_size if vocab_size is not None else spec.lm_head.shape[0]
        self._vocab_lo = 0
        if group is not None:
            from .parallel.shard import vocab_range

            self._vocab_lo = vocab_range(self.vocab_size, group.rank, group.world)[0]
        self.family = family
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.eps, self.scale = spec.eps, spec.scale
        self.kv_cache: KVCache | None = None  # set by the engine once the cache is sized
        self.device = spec.embed.device
        self.dtype = spec.embed.dtype
        self.on_cuda = self.device.type == "cuda"
        self.embed, self.norm, self.lm_head = spec.embed, spec.norm, spec.lm_head
        self.embed_scale = (
            None if spec.embed_scale is None else torch.tensor(spec.embed_scale, dtype=self.dtype, device=self.device)
        )
        self.layers: list[LeanLayer] = spec.layers
        # row counts the decode graphs' capture already ran every GEMM at (their buckets; set by whoever captures
        # them): a step with prompts pads its sampled rows to one of them past the last attention (see forward)
        self.row_buckets: list[int] | None = None
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._positions = 0
        self._rotary_tables(max_positions)
        q_rows = self.num_heads * self.head_dim
        self._q_size, self._kv_size = q_rows, self.num_kv_heads * self.head_dim
        self.workspace = None
        if self.on_cuda and workspace_rows:
            self.workspace = _decode_workspace(workspace_rows, self.num_heads, self.head_dim, self.device)
        self.kernels = False
        self.use_kernels(self.on_cuda)

    def use_kernels(self, on: bool) -> None:
        """Choose each op's implementation, once: the Triton kernels (on CUDA; the CPU tests run them under Triton's
        interpreter) or plain torch (on the CPU)."""
        self.kernels = on
        self.pdl, self.pdl_reason = 0, "not on the kernels"
        if on:
            from .kernels import attention as kattn
            from .kernels import fused

            self._k, self._kf = kattn, fused
            self._norm, self._attend = self._norm_cuda, self._attend_cuda
            self._gate = self._kf.silu_mul if self.spec.activation == "silu" else _gelu_tanh_mul
            self._up = self._up_cuda
            self.pdl, self.pdl_reason = pdl_choice(self.device, self.group is not None)
        else:
            self._norm, self._attend = self._norm_torch, self._attend_torch
            self._gate = _silu_mul if self.spec.activation == "silu" else _gelu_tanh_mul
            self._up = self._up_unfused
        self.use_split_projections(on)

    def use_split_projections(self, on: bool, make=None) -> None:
        """The output and down projections of steps of at most ``split_rows`` rows as split-K partial sums that the
        next norm adds up (:mod:`acb.kernels.projection`; docs/architecture.md), where the kernel runs: a Hopper
        GPU, bf16/fp16 weights, one rank, ``ACB_SPLIT_PROJECTIONS`` not ``0``. ``split_reason`` says why not
        (None: on). ``make``: a factory of the projections (weight -> callable returning ``[splits, rows, N]``
        partials) in place of the kernel's, which the CPU tests use to run the same data path."""
        from .kernels import projection  # (importable without a GPU)

        self._split, self.split_reason = [], "off"
        if on:
            weights = [(lw.o_w, lw.down_w) for lw in self.layers]
            self._split, self.split_reason = projection.choose(weights, self.group is not None, make, self.pdl)
        self.split_rows = projection.MAX_ROWS if self._split else 0

    def ensure(self, max_positions: int, workspace_rows: int) -> None:
        """Grow the rotary tables and the decode workspace for an engine of that geometry."""
        if self._positions < max_positions:
            self._rotary_tables(max_positions)
        if self.workspace is not None and self.workspace[0].shape[0] < workspace_rows:
            self.workspace = _decode_workspace(workspace_rows, self.num_heads, self.head_dim, self.device)

    def _rotary_tables(self, max_positions: int) -> None:
        """cos/sin of every position from the model's own rotary modules (rope scaling included), first halves."""
        self.tables = [build(max_positions) for build in self.spec.rotary]
        self._positions = max_positions

    # -- the forward ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, x: LeanInputs, token_multiple: int = 1) -> torch.Tensor:
        """Logits ``[S, vocab]`` (model dtype) for the rows ``x.logits_idx``.

        cuBLAS picks a kernel per row count and loads it the first time it meets it: 3-5 ms on an H200, up to ~70 ms
        with the device busy, while every thread waits (the event loop included). So an eagerly run step meets only
        row counts a warm-up can run first (:meth:`warm_gemms`):

        - ``token_multiple``: the step's tokens are padded up to a multiple of it (:func:`padded_tokens`; the
          engine's eager steps on CUDA: :data:`EAGER_TOKEN_MULTIPLE`). Pad tokens run through every row-wise op
          (GEMMs, norms, activations) and nothing else: attention reads and writes the real tokens only, so the pad
          rows never mix into them.
        - The last layer's keys and values are cached for every token, but only the sampled rows go on past its
          attention (output projection, MLP, head): in a step with prompts, the other rows' would be thrown away.
          Their count is padded (repeating the first) to the smallest of :attr:`row_buckets` that holds them."""
        t = x.input_ids.shape[0]
        padded = padded_tokens(t, token_multiple)
        ids = x.input_ids if padded == t else F.pad(x.input_ids, (0, padded - t))
        out = None
        if padded != t:  # attention writes the real rows; the pad rows hold whatever, row-wise ops keep them apart
            out = torch.empty(padded, self.num_heads, self.head_dim, dtype=self.dtype, device=self.device)
        h, residual = self.embed_in(ids), None
        last = len(self.layers) - 1
        rows = x.logits_idx
        if rows is None and padded != t:
            rows = torch.arange(t, device=self.device)
        elif rows is not None and self.row_buckets:
            rows = pad_rows(rows, self.row_buckets)
        # a decode step's kernel norms q and k per head itself (Qwen3, Gemma 3: see _attend_cuda)
        qk_norm = not (self.kernels and x.decode_splits)
        for i, lw in enumerate(self.layers):
            q, k, v, residual = self.before_attention(i, h, residual, qk_norm=qk_norm)
            if out is None:
                o = self._attend(i, lw, q, k, v, x)
            else:
                self._attend(i, lw, q[:t], k[:t], v[:t], x, out=out[:t])
                o = out
            o = o.reshape(q.shape[0], -1)
            if i == last and rows is not None:
                o, residual = o[rows], residual[rows]
            h = self.after_attention(i, o, residual)
        logits = self.head(h, residual, None)
        n = t if x.logits_idx is None else x.logits_idx.shape[0]
        return logits if logits.shape[0] == n else logits[:n]

    @torch.inference_mode()
    def warm_gemms(self, counts: list[int], head_counts: list[int]) -> None:
        """Run each distinct layer's GEMMs (and their activation) at every row count of ``counts``, and the LM head
        at every count of ``head_counts``, on scratch inputs: cuBLAS then has loaded the kernel of every shape an
        eager step can give it (see :meth:`forward`). No collective runs (each rank warms its own shard)."""
        layers = {}
        for lw in self.layers:  # one layer per set of shapes (alike in every family acb has today)
            key = (lw.qkv_w.shape, lw.qkv_b is not None, lw.o_w.shape, lw.gate_up_w.shape, lw.down_w.shape)
            layers.setdefault(key, lw)
        most = max(counts + head_counts, default=0)
        scratch: dict[int, torch.Tensor] = {}

        def rows(m: int, k: int) -> torch.Tensor:  # contiguous [m, k], as the forward's inputs are
            if k not in scratch:
                scratch[k] = torch.zeros(most, k, dtype=self.dtype, device=self.device)
            return scratch[k][:m]

        for lw in layers.values():
            for m in counts:
                F.linear(rows(m, lw.qkv_w.shape[1]), lw.qkv_w, lw.qkv_b)
                F.linear(rows(m, lw.o_w.shape[1]), lw.o_w)
                F.linear(self._up(rows(m, lw.gate_up_w.shape[1]), lw), lw.down_w)
        for m in head_counts:
            F.linear(rows(m, self.lm_head.shape[1]), self.lm_head)
        # the split projections and the norm that sums their partials: a compiled variant per weight shape and box of
        # rows (32 or 64), compiled here rather than by the first step that meets it
        boxes = sorted({32 if m <= 32 else 64 for m in counts if 0 < m <= self.split_rows})
        seen = set()
        for lw, split in zip(self.layers, self._split):
            if (key := (lw.o_w.shape, lw.down_w.shape, lw.post_attn_norm is None, lw.post_mlp_norm is None)) in seen:
                continue
            seen.add(key)
            for proj, pre in zip(split, (lw.post_attn_norm, lw.post_mlp_norm)):
                for m in boxes if proj is not None else ():
                    parts = proj(rows(m, proj.weight.shape[1]))
                    self._norm(parts, torch.zeros(m, parts.shape[2], dtype=self.dtype, device=self.device), lw.ln2, pre)

    # The forward in pieces, split at attention (the only op that reads the step's layout): the mixed-step graphs
    # (acb.mixed_graphs) capture everything between two attentions and run attention eagerly on the true sizes.

    def embed_in(self, ids: torch.Tensor) -> torch.Tensor:
        h = self._embed(ids)
        return h if self.embed_scale is None else h * self.embed_scale

    def before_attention(
        self,
        i: int,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        qkv_out: torch.Tensor | None = None,
        qk_norm: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i`` up to attention: ``(q, k, v, residual)``. The first layer starts the residual stream (a copy
        of ``h``); later ones add ``h`` (after the previous layer's post-MLP norm, where it has one) into it in
        place. ``qkv_out``: where the fused Q/K/V projection goes. ``qk_norm=False``: q and k come back before
        their per-head norms, which the attention kernel then applies (a decode step on CUDA)."""
        lw = self.layers[i]
        if residual is None:
            residual = h.clone()
            normed = self._norm(h, None, lw.ln1)
        elif self._partial(i - 1):
            normed = self._reduce_norm(h, residual, lw.ln1)
        else:
            normed = self._norm(h, residual, lw.ln1, self.layers[i - 1].post_mlp_norm)
        t = normed.shape[0]
        if qkv_out is None:
            qkv = F.linear(normed, lw.qkv_w, lw.qkv_b)
        else:
            qkv = torch.matmul(normed, lw.qkv_w.t(), out=qkv_out)
            if lw.qkv_b is not None:
                qkv.add_(lw.qkv_b)
        q, k, v = self._heads(qkv)
        if lw.q_norm is not None and qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head before rotary
            q = self._norm(q.reshape(-1, self.head_dim), None, lw.q_norm).view(t, self.num_heads, self.head_dim)
            k = self._norm(k.reshape(-1, self.head_dim), None, lw.k_norm).view(t, self.num_kv_heads, self.head_dim)
        return q, k, v, residual

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's ``[T, q + 2 kv]`` output as q ``[T, heads, D]``, k and v ``[T, kv heads, D]``."""
        t = qkv.shape[0]
        q = qkv[:, : self._q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self._q_size : self._q_size + self._kv_size].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, self._q_size + self._kv_size :].view(t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def after_attention(self, i: int, o: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` from attention's output ``o`` ``[T, heads * head_dim]``: the output projection and the MLP
        (``residual`` takes the attention's contribution in place); returns the MLP's output, before the post-MLP
        norm of a family that has one (Gemma 3): whatever reads it next applies that norm in its own kernel (the next
        layer's first norm, or :meth:`head`). With split projections (:meth:`use_split_projections`, steps of at
        most ``split_rows`` rows) the output and down projections give float32 partial sums ``[splits, T, N]``,
        which those norms add up (the MLP's output is returned as such). Under tensor
        parallelism each rank's heads and MLP columns give partial sums: the attention's is summed here (with the
        norm after it, :meth:`_reduce_norm`), the MLP's by whatever reads it next (the next layer's first norm, or
        :meth:`head`) unless a post-MLP norm needs it whole here (:meth:`_partial`)."""
        lw, norm = self.layers[i], self._norm
        # (a step can carry no row past the last attention: a prompt chunk that samples nothing)
        split = self._split[i] if 0 < o.shape[0] <= self.split_rows else (None, None)
        attn = F.linear(o, lw.o_w) if split[0] is None else split[0](o)
        if lw.post_attn_norm is not None:
            if self.group is not None:
                self.group.all_reduce(attn)
            normed = norm(attn, residual, lw.ln2, lw.post_attn_norm)
        elif self.group is not None:
            normed = self._reduce_norm(attn, residual, lw.ln2)
        else:
            normed = norm(attn, residual, lw.ln2)
        up = self._up(normed, lw)
        h = F.linear(up, lw.down_w) if split[1] is None else split[1](up)
        if lw.post_mlp_norm is not None and self.group is not None:
            self.group.all_reduce(h)  # the norm needs the whole sum
        return h

    def _partial(self, i: int) -> bool:
        """Whether layer ``i``'s MLP output (what :meth:`after_attention` returns) is still a per-rank partial sum."""
        return self.group is not None and self.layers[i].post_mlp_norm is None

    def _reduce_norm(self, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, add it into ``residual``, RMSNorm: one kernel where the one-shot all-reduce
        takes it (CUDA, small steps), else the sum then :attr:`_norm`."""
        normed = self.group.all_reduce_add_rmsnorm(x, residual, w, self.eps)
        if normed is None:
            normed = self._norm(self.group.all_reduce(x), residual, w)
        return normed

    def head(self, h: torch.Tensor, residual: torch.Tensor, logits_idx: torch.Tensor | None) -> torch.Tensor:
        """The last residual add, the final norm and the LM head, for the rows ``logits_idx`` (None: all)."""
        if logits_idx is not None:  # (rows are the second axis of split partial sums)
            h, residual = (h[:, logits_idx] if h.dim() == 3 else h[logits_idx]), residual[logits_idx]
        if self._partial(len(self.layers) - 1):  # the rows the head reads, summed over the ranks
            h = self.group.all_reduce(h.contiguous())
        return self._logits(self._norm(h, residual, self.norm, self.layers[-1].post_mlp_norm))

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head on the final norm's output (gathered over the ranks), soft-capped where the family does."""
        logits = F.linear(normed, self.lm_head)
        if self.group is not None:  # each rank has its slice of the vocabulary
            logits = self.group.all_gather_last(logits)[:, : self.vocab_size]
        cap = self.spec.final_softcap
        if cap:
            logits = (torch.tanh(logits.float() / cap) * cap).to(logits.dtype)
        return logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.embed)
        local = ids - self._vocab_lo  # this rank's slice of the vocabulary; other ids give zero rows
        mine = (local >= 0) & (local < self.embed.shape[0])
        h = F.embedding(local.clamp(0, self.embed.shape[0] - 1), self.embed) * mine[:, None].to(self.embed.dtype)
        return self.group.all_reduce(h)

    def _attend_cuda(self, i: int, lw: LeanLayer, q, k, v, x: LeanInputs, out=None) -> torch.Tensor:
        kv = self.kv_cache.layers[i]
        cos, sin = self.tables[lw.rope]
        if x.decode_splits:  # rotary, the cache write and the per-head norms (forward deferred them) in the kernel
            norms = None if lw.q_norm is None else (lw.q_norm, lw.k_norm, self.eps)
            o = self._k.paged_decode(q, kv, x.block_tables, x.seq_lens, self.scale, x.decode_splits,
                                     window=lw.window, workspace=self.workspace,
                                     rope=(k, v, cos, sin, x.positions, x.slot_mapping), qk_norm=norms,
                                     pdl=self.pdl)  # fmt: skip
            return o if out is None else out.copy_(o)
        self._kf.rope_and_cache(q, k, v, cos, sin, x.positions, x.slot_mapping, kv)
        if x.prefill_map is None:
            x.prefill_map = self._k.prefill_block_map(x.query_start_loc, q.shape[0], x.max_query_len,
                                                      self.num_heads // self.num_kv_heads)  # fmt: skip
        return self._k.paged_prefill(q, kv, x.block_tables, x.seq_lens, x.query_start_loc, x.max_query_len,
                                     self.scale, out=out, window=lw.window, block_map=x.prefill_map)  # fmt: skip

    def _attend_torch(self, i: int, lw: LeanLayer, q, k, v, x: LeanInputs, out=None) -> torch.Tensor:
        cos, sin = self.tables[lw.rope]
        q, k = _rope(q, cos, sin, x.positions), _rope(k, cos, sin, x.positions)
        self.kv_cache.write(i, k, v, x.slot_mapping)
        o = paged_attention_reference(q, self.kv_cache.layers[i], x.meta, self.scale, sliding_window=lw.window or None)
        return o if out is None else out.copy_(o)

    # -- fused ops on CUDA, plain torch twins on the CPU ------------------------------------------------------------

    def _up_cuda(self, x: torch.Tensor, lw: LeanLayer) -> torch.Tensor:
        """The MLP's gate/up projection and activation: one Triton kernel for a decode step's few rows, cuBLAS and
        the activation kernel for more (where cuBLAS's wide tiles win)."""
        if x.shape[0] <= self._kf.GATE_UP_ROWS:
            return self._kf.gate_up_act(x, lw.gate_up_w, self.spec.activation, pdl=self.pdl)
        return self._up_unfused(x, lw)

    def _up_unfused(self, x: torch.Tensor, lw: LeanLayer) -> torch.Tensor:
        """The fused gate/up projection, then :attr:`_gate` (the activation kernel on CUDA, torch on the CPU)."""
        return self._gate(F.linear(x, lw.gate_up_w))

    # the norms: ``residual += x`` (when given), then RMSNorm with weight ``w``; ``pre``: x is RMSNormed with it first

    def _norm_cuda(self, x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, pre=None) -> torch.Tensor:
        return self._kf.add_rmsnorm(x, residual, w, self.eps, pre, pdl=self.pdl)

    def _norm_torch(self, x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, pre=None) -> torch.Tensor:
        if x.dim() == 3:  # split partial sums: added in order, rounded as the whole product would be
            x = functools.reduce(torch.add, x.unbind(0)).to(w.dtype)
        if pre is not None:
            x = self._norm_torch(x, None, pre)
        if residual is not None:
            residual.add_(x)
            x = residual
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def _gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    g, u = gate_up.chunk(2, dim=-1)
    return F.gelu(g, approximate="tanh") * u


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
