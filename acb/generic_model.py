"""The generic path: any transformers causal LM through its own modules, attending with acb's paged attention.

Models without a family adapter (:mod:`acb.families`) run here, and so does every model with ``fast_path=False``.
Their attention layers call :func:`acb.attention.paged_attention_forward`, which on CUDA runs the Triton kernels of
:mod:`acb.kernels.attention` and elsewhere the plain-torch reference.

On CUDA acb makes these modules cheaper without changing what they compute:

- RMSNorm modules run acb's fused kernel (one kernel instead of about six): each norm is checked at start, on a
  random input of its width, against its own forward, as ``w * norm(x)`` (Llama's) or ``(1 + w) * norm(x)`` (Gemma's);
  a norm that matches neither keeps its forward;
- gated MLP modules (``down(act(gate(x)) * up(x))``, SiLU or tanh-GELU, no biases) run the gate and up projections
  and the activation in one kernel (:func:`acb.kernels.fused.gate_up_act`) on steps of at most
  :data:`~acb.kernels.fused.GATE_UP_ROWS` tokens, the decode steps: each is checked at start against its own forward
  the same way (its activation first, on its own, in float32);
- rotary embedding: a modeling module's ``apply_rotary_pos_emb`` (rotate-half, the whole head), which its attention
  layers call, runs :func:`acb.kernels.fused.rotary` (one kernel instead of about ten) inside acb's forwards of this
  model, once it is checked at start against the module's own function on random inputs of the model's geometry. The
  module keeps the replacement while an engine uses it; outside acb's forwards it calls its own function;
- the decode kernel writes the step's new keys and values to the cache itself (no separate cache write);
- these kernels (the norms, gate/up, rotary, the decode kernel and its split merge) launch under programmatic
  dependent launch at the lean path's level (:func:`acb.kernels.pdl_choice`, ``ACB_PDL``): each may launch while the
  kernel before it ends, and waits for it before it reads or writes anything. transformers' GEMMs and element-wise
  ops launch plainly, so the overlap is where two of acb's kernels meet (the norm and gate/up; rotary, attention and
  its merge);
- the decode step is captured in CUDA graphs like the lean path's (:mod:`acb.cuda_graphs`), when nothing in the
  model needs the host in the middle of a forward. Two things can:

- attention logit soft-capping (Gemma 2): the Triton kernels have none, and the reference reads the layout on the
  host; such a model decodes eagerly;
- mixture-of-experts layers: transformers' eager experts loop over the experts a step picked, which the host learns
  by reading them back (and its grouped implementation falls back to such a loop outside bf16). Inside the graphs
  acb switches the experts to :func:`graph_experts_forward`, which computes the same sum with shapes fixed by the
  step's size.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections.abc import Iterator

import torch

from .attention import AttentionMetadata
from .kernels import pdl_choice
from .kv_cache import KVCache, ModelShape
from .lean_model import pad_rows
from .step_inputs import DeviceStep

__all__ = ["GenericCausalLM", "graph_experts_forward", "GRAPH_EXPERTS"]

GRAPH_EXPERTS = "acb_graph"
"""The name :func:`graph_experts_forward` is registered under in transformers' experts interface."""


class GenericCausalLM:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kernels = None  # chosen once: on CUDA the Triton kernels, elsewhere the reference
        if device.type == "cuda":
            from .kernels import attention as kernels

            self.kernels = kernels
        self._experts = [m for m in model.modules() if _is_experts(m)]
        self.fused_norms: list[torch.nn.Module] = []
        self.fused_mlps: list[torch.nn.Module] = []
        self.fused_rotary: list[object] = []  # modeling modules whose apply_rotary_pos_emb runs the kernel
        self.row_buckets: list[int] | None = None  # the decode graphs' row counts (set by the runner)
        # the PDL level of acb's kernels in this model (its norms, gate/up, rotary, attention), and why not
        self.pdl, self.pdl_reason = pdl_choice(device, tensor_parallel=False)
        if device.type == "cuda":
            self.fuse_norms()
            self.fuse_mlps()
            self.fuse_rotary()

    def fuse_norms(self) -> None:
        """Let every RMSNorm module that acb's fused kernel reproduces run that kernel (see the module's doc)."""
        from .kernels.fused import add_rmsnorm

        for m in self.model.modules():
            if "RMSNorm" not in type(m).__name__ or "forward" in vars(m) or not _takes_one_input(m):
                continue
            weight, eps = getattr(m, "weight", None), getattr(m, "variance_epsilon", getattr(m, "eps", None))
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
                continue
            x = torch.randn(8, weight.shape[0], dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                try:
                    want = m(x)
                except Exception:  # a norm of another kind: it keeps its forward
                    continue
                if want.shape != x.shape or want.dtype != x.dtype:
                    continue
                for w in (weight, 1.0 + weight.float()):
                    if torch.allclose(add_rmsnorm(x, None, w, eps), want, rtol=1e-2, atol=1e-2):
                        m.forward = _fused_norm(m.forward, w, eps, add_rmsnorm, self.pdl)
                        self.fused_norms.append(m)
                        break

    def fuse_mlps(self) -> None:
        """Let every gated MLP module that acb's gate/up kernel reproduces run it on small steps (see the module's
        doc). Its projections stay where they are: the kernel reads the gate and up weights in place."""
        from .kernels.fused import gate_up_act

        for m in self.model.modules():
            activation = _gated_mlp_activation(m)
            if activation is None or not _takes_one_input(m):
                continue
            gate, up = m.gate_proj.weight, m.up_proj.weight
            x = torch.randn(8, gate.shape[1], dtype=gate.dtype, device=gate.device)
            with torch.no_grad():
                try:
                    want = m(x)
                except Exception:
                    continue
                got = m.down_proj(gate_up_act(x, gate, activation, up=up))
            tol = 1e-5 if gate.dtype == torch.float32 else 1e-2
            if want.shape == got.shape and torch.allclose(got, want, rtol=tol, atol=tol):
                m.forward = _fused_mlp(m.forward, m, activation, gate_up_act, self.pdl)
                self.fused_mlps.append(m)

    def fuse_rotary(self) -> None:
        """Let the modeling modules of this model's layers run acb's rotary kernel in their ``apply_rotary_pos_emb``
        inside this path's forwards, where the kernel reproduces it (see the module's doc)."""
        from .kernels.fused import rotary, rotary_fits

        param = next(self.model.parameters())
        geo = ModelShape.from_config(self.model.config)  # as the engine sizes the KV cache
        g = torch.Generator(device=param.device).manual_seed(0)
        dim = geo.head_dim
        shapes = ((1, 5, geo.num_heads, dim), (1, 5, geo.num_kv_heads, dim), (1, 5, dim), (1, 5, dim))
        q, k, cos, sin = (torch.randn(*x, generator=g, device=param.device).to(param.dtype) for x in shapes)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1, heads, T, D], as the attention modules pass them
        if not rotary_fits(q, k, cos, sin):
            return
        tol = 1e-5 if param.dtype == torch.float32 else 1e-2
        seen = set()
        for m in self.model.modules():
            module = sys.modules.get(type(m).__module__)
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if not callable(fn):
                continue
            own = fn.own if isinstance(fn, _FusedRotary) else fn
            try:
                with torch.no_grad():
                    want, got = own(q, k, cos, sin), rotary(q, k, cos, sin)
            except Exception:
                continue
            if not (isinstance(want, tuple) and len(want) == 2):
                continue
            if all(w.shape == r.shape and torch.allclose(w, r, rtol=tol, atol=tol) for w, r in zip(want, got)):
                if not isinstance(fn, _FusedRotary):
                    fn = _FusedRotary(own, rotary, rotary_fits)
                    module.apply_rotary_pos_emb = fn
                fn.users += 1
                self.fused_rotary.append(module)

    def release(self) -> None:
        """Give the modules back their own forwards (the engine closed), and the modeling modules their own rotary
        function once no engine uses the kernel in it."""
        for m in self.fused_norms + self.fused_mlps:
            del m.forward
        for module in self.fused_rotary:
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if isinstance(fn, _FusedRotary):
                fn.users -= 1
                if fn.users == 0:
                    module.apply_rotary_pos_emb = fn.own
        self.fused_norms, self.fused_mlps, self.fused_rotary = [], [], []

    def forward(
        self,
        d: DeviceStep,
        *,
        decode_only: bool,
        max_query_len: int,
        decode_splits: int = 0,
        host_layout: tuple[list[int], list[int]] | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a staged step: of ``logits_rows`` (indices into its tokens), or of every token.

        ``host_layout`` (``query_start_loc``, ``seq_lens`` as lists) is what the reference attention reads; the
        kernels read only the device tensors, which is what lets a decode step be captured."""
        rows = logits_rows
        if rows is not None and self.row_buckets:  # as the lean path does (LeanCausalLM.forward): the head then
            rows = pad_rows(rows, self.row_buckets)  # meets only row counts the graphs' capture loaded kernels for
        qsl, lens = host_layout if host_layout is not None else ([], [])
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=d.slot_mapping,
            query_start_loc=qsl,
            seq_lens=lens,
            block_tables=d.block_tables,
            decode_only=decode_only,
            kernels=self.kernels,
            device_seq_lens=d.seq_lens,
            device_query_start_loc=d.query_start_loc,
            max_query_len=max_query_len,
            decode_splits=decode_splits,
            pdl=self.pdl,
        )
        token = _ROTARY.set(self.pdl if self.fused_rotary else None)
        try:
            out = self.model(
                input_ids=d.input_ids[None],
                position_ids=d.positions[None],
                use_cache=False,
                logits_to_keep=0 if rows is None else rows,
                acb_meta=meta,
            )
        finally:
            _ROTARY.reset(token)
        return out.logits[0] if rows is logits_rows else out.logits[0, : logits_rows.shape[0]]

    def graph_blocker(self) -> str | None:
        """Why this model's decode step cannot be captured in a CUDA graph, or None."""
        if self.kernels is None:
            return "CUDA graphs need CUDA"
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "attn_logit_softcapping", None):
            return "attention soft-capping runs the reference attention, which reads the step's layout on the host"
        dynamic = sorted(t for t in _rope_types(getattr(config, "rope_parameters", None)) if t in _HOST_ROPE)
        if dynamic:
            return f"rotary scaling {dynamic} compares positions on the host each forward"
        for m in self._experts:
            if not _standard_experts(m):
                return f"{type(m).__name__} has an expert layout acb's capturable experts do not cover"
        return None

    @contextlib.contextmanager
    def capturable(self) -> Iterator[None]:
        """While capturing: mixture-of-experts layers use :func:`graph_experts_forward` (then their own again)."""
        configs = {id(m.config): m.config for m in self._experts}.values()
        before = [(c, c._experts_implementation) for c in configs]
        if before:
            from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

            ALL_EXPERTS_FUNCTIONS.register(GRAPH_EXPERTS, graph_experts_forward)
        try:
            for c, _ in before:
                c._experts_implementation = GRAPH_EXPERTS
            yield
        finally:
            for c, impl in before:
                c._experts_implementation = impl


_ROTARY: contextvars.ContextVar[int | None] = contextvars.ContextVar("acb_generic_rotary", default=None)
"""Inside a forward of a generic model whose modeling modules' rotary runs the kernel: the PDL level the kernel
launches at (:func:`acb.kernels.pdl_choice`); None everywhere else."""


class _FusedRotary:
    """A modeling module's ``apply_rotary_pos_emb`` while engines use the kernel in it: the kernel inside their
    forwards (for inputs it takes), the module's own function everywhere else (other models, other callers)."""

    def __init__(self, own, kernel, fits) -> None:
        self.own, self.kernel, self.fits = own, kernel, fits
        self.users = 0  # generic models whose check passed and that have not been released

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        pdl = _ROTARY.get()
        if pdl is not None and not args and not kwargs and self.fits(q, k, cos, sin):
            return self.kernel(q, k, cos, sin, pdl=pdl)
        return self.own(q, k, cos, sin, *args, **kwargs)


def _fused_norm(own, weight: torch.Tensor, eps: float, kernel, pdl: int):
    """A norm's forward through the fused kernel, for inputs of the width and dtype it was checked at, launched at
    PDL level ``pdl``."""
    width, dtype = weight.shape[0], own.__self__.weight.dtype

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != dtype or hidden_states.shape[-1] != width:
            return own(hidden_states)
        return kernel(hidden_states.reshape(-1, width), None, weight, eps, pdl=pdl).view(hidden_states.shape)

    return forward


def _gated_mlp_activation(m: torch.nn.Module) -> str | None:
    """``"silu"`` or ``"gelu_tanh"`` when ``m`` holds a gated MLP's parts (bias-free ``gate_proj``, ``up_proj`` and
    ``down_proj`` linears of matching shapes, weights with contiguous rows) and its ``act_fn`` is that function, to
    float32 precision, on [-8, 8]; else None. Whether ``m`` combines them as ``down(act(gate) * up)`` is for its
    caller to check."""
    parts = [getattr(m, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(m, "act_fn", None)
    if not all(isinstance(p, torch.nn.Linear) and p.bias is None for p in parts) or not callable(act):
        return None
    gate, up, down = (p.weight for p in parts)
    if gate.shape != up.shape or down.shape[1] != gate.shape[0] or gate.stride(-1) != 1 or up.stride(-1) != 1:
        return None
    t = torch.linspace(-8, 8, 1601, device=gate.device)
    try:
        with torch.no_grad():
            y = act(t)
    except Exception:
        return None
    for name, f in (("silu", torch.nn.functional.silu), ("gelu_tanh", _gelu_tanh)):
        if isinstance(y, torch.Tensor) and y.shape == t.shape and torch.allclose(y, f(t), rtol=1e-6, atol=1e-6):
            return name
    return None


def _gelu_tanh(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(t, approximate="tanh")


def _fused_mlp(own, m: torch.nn.Module, activation: str, kernel, pdl: int):
    """A gated MLP's forward through the gate/up kernel (launched at PDL level ``pdl``), for steps of at most
    ``GATE_UP_ROWS`` tokens of the width and dtype it was checked at; its own forward for the rest (prompt steps:
    cuBLAS's large tiles)."""
    from .kernels.fused import GATE_UP_ROWS

    gate, up = m.gate_proj.weight, m.up_proj.weight
    width, dtype = gate.shape[1], gate.dtype

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype or x.shape[-1] != width or x.numel() > GATE_UP_ROWS * width:
            return own(x)
        h = kernel(x.reshape(-1, width), gate, activation, up=up, pdl=pdl)
        return m.down_proj(h).view(*x.shape[:-1], -1)

    return forward


_HOST_ROPE = ("dynamic", "longrope", "llama3_dynamic")


def _rope_types(params) -> list[str]:
    """Every ``rope_type`` in a config's rotary parameters (a dict, or one dict per layer kind)."""
    if not isinstance(params, dict):
        return []
    found = [params["rope_type"]] if isinstance(params.get("rope_type"), str) else []
    return found + [t for v in params.values() for t in _rope_types(v)]


def _takes_one_input(module: torch.nn.Module) -> bool:
    """Whether ``module.forward`` takes exactly one argument (a gated norm takes two)."""
    params = list(inspect.signature(module.forward).parameters.values())
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _is_experts(module: torch.nn.Module) -> bool:
    """A transformers experts module (``@use_experts_implementation``: all experts' weights in 3-D tensors)."""
    return hasattr(module, "has_gate") and hasattr(module, "down_proj") and hasattr(module, "num_experts")


def _standard_experts(m: torch.nn.Module) -> bool:
    """[gate; up] concatenated in ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, no biases, no expert norm."""
    return (
        m.has_gate
        and not getattr(m, "has_bias", False)
        and not getattr(m, "is_transposed", False)
        and getattr(m, "is_concatenated", True)
        and not getattr(m, "has_post_expert_norm", False)
        and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
    )


def graph_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Mixture-of-experts output with no data-dependent shapes, so that it can be captured.

    ``hidden_states [T, H]``, each token's ``k`` experts ``top_k_index [T, k]`` and their weights. With fewer
    (token, expert) pairs than experts, each pair gathers its expert's weights (reading ``T * k`` experts); otherwise
    every token goes through every expert, weighted by its routing weight, 0 for the experts it did not pick (reading
    each expert once, as the eager loop does when most experts are picked)."""
    tokens, k = top_k_index.shape
    experts = self.gate_up_proj.shape[0]
    if tokens * k < experts:
        idx = top_k_index.reshape(-1)
        x = hidden_states.repeat_interleave(k, 0)  # [T*k, H]
        h = self._apply_gate(torch.bmm(self.gate_up_proj[idx], x[:, :, None])[..., 0])
        out = torch.bmm(self.down_proj[idx], h[:, :, None])[..., 0] * top_k_weights.reshape(-1, 1)
        return out.view(tokens, k, -1).sum(1).to(hidden_states.dtype)
    weights = top_k_weights.new_zeros(tokens, experts).scatter_(1, top_k_index, top_k_weights)  # [T, E]
    x = hidden_states.expand(experts, tokens, hidden_states.shape[-1])
    h = self._apply_gate(torch.bmm(x, self.gate_up_proj.transpose(1, 2)))  # [E, T, I]
    out = torch.bmm(h, self.down_proj.transpose(1, 2)) * weights.t()[:, :, None]  # [E, T, H]
    return out.sum(0).to(hidden_states.dtype)
