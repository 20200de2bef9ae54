"""Gradient and update observation on sampled steps: which parameters the optimizer steps, their local
shards under FSDP2 or tensor parallelism, the clipped global norm and the real update the optimizer made.
The per-layer squared norms are accumulated by :class:`GradNorms` (fused kernels, no sync)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import dist
from .config import IntrospectConfig
from .hooks import plain_name
from .stats import to_device
from .writer import AsyncWriter


class GradientObserver:
    """Feeds a sampled step's gradients, weights and updates to :class:`GradNorms` (kernels only, no sync)."""

    def __init__(self, model: nn.Module, config: IntrospectConfig, writer: AsyncWriter) -> None:
        self.model = model
        self.config = config
        self.writer = writer
        named = [(plain_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.grad = GradNorms([n for n, _ in named])
        self._param_pos: dict[int, Optional[int]] = {id(p): i for i, (_, p) in enumerate(named)}
        self.params = [p for _, p in named]

    def observe(self, optimizer: Optional[torch.optim.Optimizer], *, clipping: bool) -> list[Any]:
        """Observes the step's gradients (see :meth:`Introspector.observe_gradients`); returns the optimizer
        hook handles to remove when the step ends."""
        handles: list[Any] = []
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer -> torch optimizer
        if clipping and not hasattr(opt, "register_step_pre_hook"):
            raise ValueError(
                f"`observe_gradients(clipping=True)` reads the clipped gradients when the optimizer steps, and needs "
                f"it: pass `observe_gradients(optimizer, clipping=True)` (got {optimizer!r})."
            )
        plist = [p for g in opt.param_groups for p in g["params"]] if opt is not None else self.params
        if any(id(p) not in self._param_pos for p in plist):
            self._refresh_params(plist)
        pos, grads, params, owners = [], [], [], []
        for p in plist:  # Python bookkeeping only; the norms below are fused launches
            i = self._param_pos.get(id(p))
            if i is not None and p.grad is not None:
                pos.append(i)
                grads.append(p.grad.detach())
                params.append(p.detach())
                owners.append(p)
        if not pos:
            return handles
        grads, grad_w = self._local_parts("grad", pos, grads)
        params, param_w = self._local_parts("param", pos, params)
        self.grad.observe(pos, grads, params, self.config.param_grad_norms, grad_w, param_w)
        clipped_read = [not clipping]

        def read_clipped() -> None:  # once per step: the gradients as they are now (clipped in place or replaced)
            if not clipped_read[0]:
                clipped_read[0] = True
                kept = [(i, p.grad.detach()) for i, p in zip(pos, owners) if p.grad is not None]
                local, w = self._local_parts("grad", [i for i, _ in kept], [g for _, g in kept])
                self.grad.observe_clipped(local, w)

        if clipping:
            handles.append(opt.register_step_pre_hook(lambda _opt, _args, _kwargs: read_clipped()))  # type: ignore[union-attr]
        update = self.config.update_ratios and opt is not None and hasattr(opt, "register_step_post_hook")
        if update:
            with torch.no_grad():
                before = torch._foreach_mul(params, 1.0)
        if update or clipping:
            fired = [False]

            def after_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
                read_clipped()
                if update and not fired[0]:
                    fired[0] = True
                    self.grad.observe_update(pos, before, params, param_w)

            handles.append(opt.register_step_post_hook(after_step))  # type: ignore[union-attr]
        return handles

    def _refresh_params(self, plist: Sequence[Tensor]) -> None:
        """Maps the model's parameters anew when the optimizer holds ones unknown so far: FSDP2's ``fully_shard``
        and Lightning's ``configure_model`` replace them after the Introspector was made. Names (and so tags)
        stay; parameters the model does not own are remembered, so that they cost one check."""
        named = [(plain_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        if [n for n, _ in named] == self.grad.param_names:
            self._param_pos = {id(p): i for i, (_, p) in enumerate(named)}
            self.params = [p for _, p in named]
        for p in plist:
            self._param_pos.setdefault(id(p), None)  # not the model's: skipped

    def _local_parts(self, kind: str, pos: list[int], tensors: list[Tensor]) -> tuple[list[Tensor], Optional[Tensor]]:
        """The local shards of DTensors (FSDP2, tensor parallelism) and each one's weight in the flush's sum over
        ranks (1 where this rank counts the shard, 0 where another rank holds the same elements); ``tensors``
        and None when none is a DTensor."""
        if not any(dist.is_dtensor(t) for t in tensors):
            return tensors, None
        self.grad.sharded = True

        def weights() -> list[float]:
            out = []
            for i, t in zip(pos, tensors):
                try:
                    out.append(float(dist.counted_here(t)))
                except ValueError as err:
                    out.append(0.0)
                    self.writer.alert(
                        f"lightning_introspect: the {kind} of parameter {self.grad.param_names[i]!r} is left out of "
                        f"the gradient norms: {err}, whose norm cannot be taken shard by shard.", RuntimeWarning,
                        key=f"partial:{self.grad.param_names[i]}",
                    )
            return out

        return [dist.local_part(t) for t in tensors], self.grad.weights(kind, pos, weights, tensors[0].device)


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def sparse_sq_norm(t: Tensor) -> Tensor:
    """Squared L2 norm (0-dim float64) of a sparse tensor, the norm of its coalesced form, without a sync.

    A COO tensor may hold an index several times (an ``nn.Embedding(sparse=True)`` gradient holds one row per
    lookup), and the entries of one index add up before they are squared. ``coalesce()`` sums them but sizes
    its output from the data, a device-to-host sync on CUDA; here the entries are sorted by index and added
    into a buffer of the same fixed size, each into the slot of its index's first occurrence. Compressed
    layouts (CSR, CSC, BSR, BSC) hold each index once: their values are squared as they are.
    """
    if t.layout in _COMPRESSED:
        return t.values().double().square().sum()
    if t.layout != torch.sparse_coo:
        raise TypeError(f"sparse_sq_norm takes a sparse tensor, got layout {t.layout}.")
    values = t._values()
    if t.is_coalesced() or values.shape[0] <= 1:  # a host flag and a shape: no read
        return values.double().square().sum()
    indices = t._indices()  # (sparse_dim, nnz)
    key = indices[0]
    for d in range(1, indices.shape[0]):  # row-major linear index of each entry
        key = key * t.shape[d] + indices[d]
    key, order = key.sort()
    first = torch.ones_like(key, dtype=torch.bool)
    torch.ne(key[1:], key[:-1], out=first[1:])
    slot = first.cumsum(0).sub_(1)
    summed = torch.zeros(values.shape, dtype=torch.float64, device=values.device)
    summed.index_add_(0, slot, values.index_select(0, order).double())
    return summed.square().sum()


class GradNorms:
    """Per-layer squared norms of gradients, weights and optimizer updates for one sampled step.

    Layers are the modules that own parameters (a parameter ``a.b.weight`` belongs to layer ``a.b``).
    Squared norms come from ``torch._foreach_norm`` (one fused launch per dtype/device group; sparse
    gradients, e.g. of ``nn.Embedding(sparse=True)``, through :func:`sparse_sq_norm`), are summed per layer
    with one ``index_add_`` and are read on the host only at the flush. ``clipped_sq`` is the squared global
    norm of the gradients the optimizer step used, after any clipping (see ``observe_clipped``).

    Sharded parameters (DTensors: FSDP2's ``fully_shard``, tensor parallelism) are read through their local
    shards; ``weights`` (0 or 1 per tensor, from :func:`~lightning_introspect.core.dist.counted_here`) keep
    each distinct element once in a sum over ranks, and ``sharded`` tells the flush to do that sum, in its
    existing all-reduce: no collective per parameter, none outside the flush.
    """

    def __init__(self, param_names: Sequence[str]) -> None:
        self.param_names = list(param_names)
        self.layer_names: list[str] = []
        layer_index: dict[str, int] = {}
        self._param_layer: list[int] = []
        for name in self.param_names:
            layer = name.rsplit(".", 1)[0] if "." in name else "(root)"
            if layer not in layer_index:
                layer_index[layer] = len(self.layer_names)
                self.layer_names.append(layer)
            self._param_layer.append(layer_index[layer])
        self._index_cache: dict[tuple, Tensor] = {}
        self.grad_sq: Optional[Tensor] = None  # (L,)
        self.weight_sq: Optional[Tensor] = None  # (L,)
        self.update_sq: Optional[Tensor] = None  # (L,)
        self.param_grad: Optional[Tensor] = None  # (P,)
        self.clipped_sq: Optional[Tensor] = None  # (1,)
        self.observed = False  # host flags: whether grads / updates / clipped grads arrived this window
        self.updated = False
        self.clipped = False
        self.observed_params: set[int] = set()
        self.skipped_updates = 0
        self.sharded = False  # a DTensor was observed: the buffers hold this rank's share of a sum over ranks

    def _cached(
        self, key: tuple, values: Callable[[], Sequence[float]], device: torch.device, dtype: torch.dtype = torch.long
    ) -> Tensor:
        """A small tensor on ``device`` (an index, a weight per tensor), built once per key (parameter sets
        rarely change)."""
        idx = self._index_cache.get((key, device))
        if idx is None:
            idx = self._index_cache[(key, device)] = to_device(values(), dtype, device)
        return idx

    def weights(self, kind: str, positions: Sequence[int], values: Callable[[], Sequence[float]],
                device: torch.device) -> Tensor:
        """(n,) float64 weights of the tensors of ``positions`` (``kind``: "grad" or "param"), made once."""
        return self._cached(("weight", kind, tuple(positions)), values, device, torch.float64)

    def _index(self, positions: tuple, device: torch.device) -> Tensor:
        """Layer of each parameter position."""
        return self._cached(("layer", positions), lambda: [self._param_layer[i] for i in positions], device)

    def _pidx(self, positions: tuple, device: torch.device) -> Tensor:
        """The parameter positions themselves."""
        return self._cached(("param", positions), lambda: list(positions), device)

    def _buffers(self, device: torch.device) -> None:
        if self.grad_sq is None:
            L, P = len(self.layer_names), len(self.param_names)
            self.grad_sq = torch.zeros(L, dtype=torch.float64, device=device)
            self.weight_sq = torch.zeros(L, dtype=torch.float64, device=device)
            self.update_sq = torch.zeros(L, dtype=torch.float64, device=device)
            self.param_grad = torch.zeros(P, dtype=torch.float64, device=device)
            self.clipped_sq = torch.zeros(1, dtype=torch.float64, device=device)

    @staticmethod
    def _sq_norms(tensors: Sequence[Tensor]) -> Tensor:
        """(n,) float64 squared L2 norms, on the first tensor's device; sparse tensors of any layout too
        (``torch._foreach_norm`` takes dense tensors only)."""
        device = tensors[0].device
        if all(t.layout == torch.strided for t in tensors):
            norms = torch._foreach_norm(list(tensors))
            return torch.stack([n.to(device) for n in norms]).double().square()
        dense = [t for t in tensors if t.layout == torch.strided]
        dense_sq = iter(torch._foreach_norm(dense) if dense else ())
        return torch.stack([
            next(dense_sq).to(device).double().square() if t.layout == torch.strided else sparse_sq_norm(t).to(device)
            for t in tensors
        ])

    @torch.no_grad()
    def observe(
        self, positions: Sequence[int], grads: list[Tensor], params: list[Tensor], per_param: bool,
        grad_weights: Optional[Tensor] = None, param_weights: Optional[Tensor] = None,
    ) -> None:
        """Adds the squared gradient and weight norms of parameters ``positions`` (indices into param_names),
        each times its weight when weights are given (local shards of sharded parameters)."""
        if not grads:
            return
        device = grads[0].device
        self._buffers(device)
        assert self.grad_sq is not None and self.weight_sq is not None and self.param_grad is not None
        pos = tuple(positions)
        idx = self._index(pos, device)
        g2 = self._sq_norms(grads)
        if grad_weights is not None:
            g2 = g2 * grad_weights
        w2 = self._sq_norms(params)
        if param_weights is not None:
            w2 = w2 * param_weights
        self.grad_sq.index_add_(0, idx, g2)
        self.weight_sq.index_add_(0, idx, w2)
        if per_param:
            self.param_grad.index_add_(0, self._pidx(pos, device), g2)
        self.observed = True
        self.observed_params.update(pos)

    def observed_layers(self) -> set[int]:
        """Indices of the layers with a gradient in this window (host bookkeeping)."""
        return {self._param_layer[i] for i in self.observed_params}

    @torch.no_grad()
    def observe_update(
        self, positions: Sequence[int], before: Sequence[Tensor], after: Sequence[Tensor], weights: Optional[Tensor] = None
    ) -> None:
        """Adds the squared norms of the real parameter change ``after - before`` made by an optimizer step."""
        if not before:
            return
        device = before[0].device
        self._buffers(device)
        assert self.update_sq is not None
        deltas = torch._foreach_sub(list(after), list(before))
        u2 = self._sq_norms(deltas)
        if weights is not None:
            u2 = u2 * weights
        self.update_sq.index_add_(0, self._index(tuple(positions), device), u2)
        self.updated = True

    @torch.no_grad()
    def observe_clipped(self, grads: list[Tensor], weights: Optional[Tensor] = None) -> None:
        """Adds the squared global norm of ``grads`` as the optimizer step uses them (after clipping)."""
        if not grads:
            return
        device = grads[0].device
        self._buffers(device)
        assert self.clipped_sq is not None
        sq = self._sq_norms(grads)
        self.clipped_sq.add_((sq * weights if weights is not None else sq).sum())
        self.clipped = True

    def take(self, per_param: bool) -> list[Tensor]:
        """Hands over this window's buffers ([grad, weight, update] squared norms per layer, the squared global
        norm after clipping, and per parameter with ``per_param``), to be packed possibly on another thread;
        the next window gets fresh ones."""
        assert self.grad_sq is not None and self.weight_sq is not None and self.update_sq is not None
        assert self.clipped_sq is not None
        parts = [self.grad_sq, self.weight_sq, self.update_sq, self.clipped_sq]
        if per_param:
            assert self.param_grad is not None
            parts.append(self.param_grad)
        self.grad_sq = self.weight_sq = self.update_sq = self.param_grad = self.clipped_sq = None
        self.reset()
        return parts

    def zero_parts(self, per_param: bool, device: torch.device) -> list[Tensor]:
        """Zero buffers shaped as :meth:`take` returns them: a sharded window without gradients still joins
        the flush's sum over ranks with the same payload."""
        L, P = len(self.layer_names), len(self.param_names)
        sizes = [L, L, L, 1] + ([P] if per_param else [])
        return [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]

    def reset(self) -> None:
        self.observed = False
        self.updated = False
        self.clipped = False
        self.observed_params = set()
        if self.grad_sq is not None:
            for t in (self.grad_sq, self.weight_sq, self.update_sq, self.param_grad, self.clipped_sq):
                assert t is not None
                t.zero_()
