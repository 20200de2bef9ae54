"""Gradient and update observation on sampled steps: which parameters the optimizer steps, their local
shards under FSDP2 or tensor parallelism, the clipped global norm and the real update the optimizer made.
The reductions themselves are :class:`~lightning_introspect.core.stats.GradNorms`."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from . import dist
from .config import IntrospectConfig
from .hooks import plain_name
from .stats import GradNorms
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
            handles.append(opt.register_step_pre_hook(lambda _opt, _args, _kwargs: read_clipped()))
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

            handles.append(opt.register_step_post_hook(after_step))
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
