"""Tests of the gradient figures (:mod:`lightning_introspect.core.gradients`): per-layer, per-parameter and
global norms, update ratios and sparse gradients, against one-shot torch oracles; plain loops, no Trainer."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import pytest
import torch
from helpers.models import mlp
from torch import Tensor, nn

from lightning_introspect.core import IntrospectConfig, Introspector
from lightning_introspect.core.gradients import GradNorms, sparse_sq_norm


Scalars = dict[str, dict[int, float]]


def config(**kwargs: Any) -> IntrospectConfig:
    """Every step sampled; gradient figures off unless asked for."""
    base: dict[str, Any] = dict(every_n_steps=1, warmup_steps=0, grad_norms=False)
    base.update(kwargs)
    return IntrospectConfig(**base)


def _train_step(intro: Introspector, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One step; returns grads, weights before and weights after the optimizer step (oracle copies)."""
    with intro.step(step):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        intro.observe_gradients(opt)
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return grads, before, after


def _norm(tensors: Sequence[Tensor]) -> float:
    return torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors])).item()


def test_gradient_norms_global_per_layer_per_parameter_and_update_ratio() -> None:
    """Test grad_norm (global, per layer), param_grad_norm, grad_to_weight and update_to_weight against torch."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)  # an update that is not lr * grad
    out: Scalars = defaultdict(dict)
    intro = Introspector(model, config(grad_norms=True, param_grad_norms=True, activations=False, dead_units=False,
                                       histograms=False),
                         on_scalars=lambda s, step: [out[t].__setitem__(step, v) for t, v in s.items()])
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    oracles = [_train_step(intro, model, opt, step, x, y) for step in range(11)]  # windows folded 8 at a time
    intro.close()
    for step, (grads, before, after) in enumerate(oracles):
        assert out["grad_norm/global"][step] == pytest.approx(
            torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads.values()])).item(), rel=1e-5)
        for layer in ("0", "3", "5"):
            names = [f"{layer}.weight", f"{layer}.bias"]
            g_norm, w_norm = _norm([grads[n] for n in names]), _norm([before[n] for n in names])
            u_norm = _norm([after[n] - before[n] for n in names])
            assert out[f"grad_norm/{layer}"][step] == pytest.approx(g_norm, rel=1e-5)
            assert out[f"grad_to_weight/{layer}"][step] == pytest.approx(g_norm / w_norm, rel=1e-5)
            assert out[f"update_to_weight/{layer}"][step] == pytest.approx(u_norm / w_norm, rel=1e-4)
            for n in names:
                assert out[f"param_grad_norm/{n}"][step] == pytest.approx(grads[n].norm().item(), rel=1e-5)
        u_all = _norm([after[n] - before[n] for n in grads])
        assert out["update_to_weight/global"][step] == pytest.approx(u_all / _norm(list(before.values())), rel=1e-4)
    assert not any(t.startswith("activation_") for t in out)


def test_grad_norms_of_two_parameter_halves_add_up() -> None:
    """Test that GradNorms fed two parameter halves (two optimizers) equals GradNorms fed all parameters."""
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(10)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    params = [p.detach() for p in model.parameters()]
    split, whole = GradNorms(names), GradNorms(names)
    half = len(names) // 2
    split.observe(range(half), grads[:half], params[:half], per_param=True)
    split.observe(range(half, len(names)), grads[half:], params[half:], per_param=True)
    whole.observe(range(len(names)), grads, params, per_param=True)
    for key in ("grad_sq", "weight_sq", "param_grad"):
        torch.testing.assert_close(getattr(split, key), getattr(whole, key))
    assert split.observed_layers() == whole.observed_layers() == {0, 1, 2}


def _uncoalesced(sparse_dims: int, dense_shape: tuple[int, ...]) -> Tensor:
    """A COO tensor of shape (5,) * sparse_dims + dense_shape with 12 entries on at most 5 indices (duplicates)."""
    g = torch.Generator().manual_seed(11)
    indices = torch.randint(0, 5, (sparse_dims, 12), generator=g)
    indices[:, 1] = indices[:, 0]  # at least one index held twice
    values = torch.randn(12, *dense_shape, generator=g)
    return torch.sparse_coo_tensor(indices, values, (5,) * sparse_dims + dense_shape)


@pytest.mark.parametrize(("sparse_dims", "dense_shape"), [(1, (3,)), (2, ()), (2, (2,)), (1, ())])
def test_sparse_sq_norm_of_uncoalesced_coo_sums_duplicates_first(sparse_dims: int, dense_shape: tuple[int, ...]) -> None:
    """Test that the squared norm of an uncoalesced COO tensor equals that of its dense (coalesced) form."""
    t = _uncoalesced(sparse_dims, dense_shape)
    assert not t.is_coalesced()
    expected = t.to_dense().double().square().sum()
    assert t._values().double().square().sum() != pytest.approx(expected.item())  # duplicates matter here
    torch.testing.assert_close(sparse_sq_norm(t), expected)
    torch.testing.assert_close(sparse_sq_norm(t.coalesce()), expected)


@pytest.mark.parametrize("layout", [torch.sparse_csr, torch.sparse_csc])
def test_sparse_sq_norm_of_compressed_layouts(layout: torch.layout) -> None:
    """Test that CSR and CSC tensors give the squared norm of their dense form."""
    dense = _uncoalesced(2, ()).to_dense()
    t = dense.to_sparse_csr() if layout == torch.sparse_csr else dense.to_sparse_csc()
    torch.testing.assert_close(sparse_sq_norm(t), dense.double().square().sum())


def test_grad_norms_mix_sparse_and_dense_gradients_in_order() -> None:
    """Test that GradNorms takes sparse and dense gradients in one call, each norm at its own position."""
    names = ["emb.weight", "fc.weight", "fc.bias"]
    grads = [_uncoalesced(1, (3,)), torch.randn(2, 3), torch.randn(2)]
    params = [torch.randn(5, 3), torch.randn(2, 3), torch.randn(2)]
    norms = GradNorms(names)
    norms.observe(range(3), grads, params, per_param=True)
    expected = torch.stack([t.to_dense().double().square().sum() for t in grads])
    torch.testing.assert_close(norms.param_grad, expected)
    torch.testing.assert_close(norms.grad_sq, torch.stack([expected[0], expected[1:].sum()]))
