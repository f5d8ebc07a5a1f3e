"""Piecewise CUDA graphs for the steps that start prompts (prefill and mixed steps) of the lean path.

A step that starts prompts has a layout no graph can fix in advance (how many rows, how long each query), but only
attention reads it. So the forward is cut at each attention into ``layers + 1`` pieces — the embedding and the first
layer up to its attention; each layer's output projection and MLP with the next layer's norm and Q/K/V projection;
the last layer's rest — and each piece is captured once per token bucket (a padded token count); the final norm and
the LM head are one more graph per bucket of sampled rows (the head's GEMM costs in proportion to its rows). A step
of ``T`` tokens runs on the smallest bucket ``>= T``: its input ids are copied in, then each piece is one replay, and
each attention runs eagerly between two replays on the step's true layout (the ``T`` real tokens of the bucket's
static Q/K/V, written into its static attention output). Per layer that is one replay and two kernel launches
(rotary + KV write, attention) instead of about ten launches.

Rows ``T..bucket`` of the static buffers hold whatever the last step of that bucket left: every piece is row-wise
(GEMMs, norms, activations), so they never mix into the real rows, and the LM head reads only the sampled rows.

On the CPU (tests) the same pieces run eagerly on the same padded buffers, so the decomposition and the padding are
checked against the plain forward without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lean_model import LeanCausalLM, LeanInputs

__all__ = ["MixedGraphs", "mixed_buckets"]


def mixed_buckets(largest: int, smallest: int = 32, factor: int = 2) -> list[int]:
    """Buckets: ``smallest`` times powers of ``factor`` below ``largest``, and ``largest`` itself."""
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= factor
    return out + [largest]


@dataclass(eq=False)
class _Bucket:
    tokens: int
    ids: torch.Tensor  # [tokens] the step's input ids (static input)
    rows: torch.Tensor  # [max_rows] the rows whose logits are needed (static input)
    qkv: torch.Tensor  # [tokens, q + 2 kv] every layer's fused Q/K/V projection
    attn: torch.Tensor  # [tokens, heads, head_dim] every layer's attention output
    normed: tuple[torch.Tensor, torch.Tensor] | None  # per-head-normed Q and K (families with Q/K norms)
    residual: torch.Tensor | None = None
    h: torch.Tensor | None = None  # the last layer's output
    outs: list = field(default_factory=list)  # per layer (q, k, v): what its attention reads
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # per row bucket
    graphs: list[torch.cuda.CUDAGraph] = field(default_factory=list)  # the pieces
    heads: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # per row bucket


class MixedGraphs:
    def __init__(self, lean: LeanCausalLM, max_tokens: int, max_rows: int, device: torch.device) -> None:
        """Buckets up to ``max_tokens`` tokens, logits for up to ``max_rows`` rows. On CUDA every piece of every
        bucket is run once (Triton compiles its kernels) and captured; on the CPU nothing is captured."""
        self.lean, self.device = lean, device
        self.capture = device.type == "cuda"
        self.max_tokens, self.max_rows = max_tokens, max_rows
        self.buckets = [self._bucket(b) for b in mixed_buckets(max_tokens)]
        self.row_buckets = mixed_buckets(max_rows, smallest=min(4, max_rows), factor=4)
        if self.capture:
            pool = torch.cuda.graph_pool_handle()
            for bk in reversed(self.buckets):  # largest first: the smaller ones reuse its pool memory
                self._capture(bk, pool)

    def _bucket(self, tokens: int) -> _Bucket:
        lean, dev = self.lean, self.device
        dtype = lean.dtype
        qk_norm = any(lw.q_norm is not None for lw in lean.layers)
        return _Bucket(
            tokens=tokens,
            ids=torch.zeros(tokens, dtype=torch.int64, device=dev),
            rows=torch.zeros(self.max_rows, dtype=torch.int64, device=dev),
            qkv=torch.zeros(tokens, lean._q_size + 2 * lean._kv_size, dtype=dtype, device=dev),
            attn=torch.zeros(tokens, lean.num_heads, lean.head_dim, dtype=dtype, device=dev),
            normed=(torch.zeros(tokens, lean.num_heads, lean.head_dim, dtype=dtype, device=dev),
                    torch.zeros(tokens, lean.num_kv_heads, lean.head_dim, dtype=dtype, device=dev))
            if qk_norm else None,
        )  # fmt: skip

    # -- the pieces -------------------------------------------------------------------------------------------------

    def _piece(self, bk: _Bucket, j: int) -> None:
        """Piece ``j`` of ``bk`` (0: embedding to the first attention; ``layers``: the rest of the last layer),
        computed now (eagerly, or while a graph captures it)."""
        lean = self.lean
        if j == 0:
            h, residual = lean.embed_in(bk.ids), None
        else:
            residual = bk.residual
            h = lean.after_attention(j - 1, bk.attn.view(bk.tokens, -1), residual)
        if j == len(lean.layers):
            bk.h = h
            return
        q, k, v, bk.residual = lean.before_attention(j, h, residual, qkv_out=bk.qkv)
        if bk.normed is not None and lean.layers[j].q_norm is not None:  # normed copies: one static place
            q, k = bk.normed[0].copy_(q), bk.normed[1].copy_(k)
        if len(bk.outs) <= j:
            bk.outs.append((q, k, v))
        else:
            bk.outs[j] = (q, k, v)

    def _head(self, bk: _Bucket, rows: int) -> None:
        """The logits of the first ``rows`` entries of ``bk.rows`` (a row bucket)."""
        bk.logits[rows] = self.lean.head(bk.h, bk.residual, bk.rows[:rows])

    def _capture(self, bk: _Bucket, pool) -> None:
        pieces = range(len(self.lean.layers) + 1)
        with torch.inference_mode():
            for j in pieces:  # eagerly first: every kernel compiled before any capture
                self._piece(bk, j)
            for rows in self.row_buckets:
                self._head(bk, rows)
            torch.cuda.synchronize(self.device)
            for j in pieces:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(bk, j)
                bk.graphs.append(graph)
            for rows in reversed(self.row_buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._head(bk, rows)
                bk.heads[rows] = graph
        torch.cuda.synchronize(self.device)

    # -- a step ---------------------------------------------------------------------------------------------------

    def fits(self, tokens: int, rows: int) -> bool:
        return tokens <= self.max_tokens and rows <= self.max_rows

    @torch.inference_mode()
    def forward(self, x: LeanInputs, tokens: int, rows: int) -> torch.Tensor:
        """Logits ``[rows, vocab]`` of the sampled rows of a step of ``tokens`` tokens whose sampled rows are
        ``x.logits_idx`` (``rows`` of them); the same as ``lean.forward(x)``."""
        bk = next(b for b in self.buckets if b.tokens >= tokens)
        bk.ids[:tokens].copy_(x.input_ids)
        bk.rows[:rows].copy_(x.logits_idx)
        lean = self.lean
        for j, lw in enumerate(lean.layers):
            if self.capture:
                bk.graphs[j].replay()
            else:
                self._piece(bk, j)
            q, k, v = bk.outs[j]
            lean._attend(j, lw, q[:tokens], k[:tokens], v[:tokens], x, out=bk.attn[:tokens])
        head = next(r for r in self.row_buckets if r >= rows)
        if self.capture:
            bk.graphs[len(lean.layers)].replay()
            bk.heads[head].replay()
        else:
            self._piece(bk, len(lean.layers))
            self._head(bk, head)
        return bk.logits[head][:rows]

    def release(self) -> None:
        for bk in self.buckets:
            bk.graphs.clear()
            bk.heads.clear()
