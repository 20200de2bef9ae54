"""Scenario: ``torch.compile`` with batches whose shape changes (a partial last batch, a new sequence length).

A shape first seen on an unsampled step is compiled without Introspect's hooks; every sampled step must still
log activation statistics, and Introspect must not make Dynamo compile more than the user's model needs.

Backends: ``eager`` and ``aot_eager`` run Dynamo's tracing and guards (what decides which graph runs and when
it recompiles) and, for ``aot_eager``, AOT autograd, without inductor's code generation: inductor's first
compile of even a two-layer MLP took over a minute on the 2-core test machine, so no test here uses it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

import lightning.pytorch as pl
from helpers.robust_common import layer_tags, loader, make_data, read_scalars, trainer_kwargs
from helpers.tb import read_events
from lightning_introspect import Introspect
from lightning_introspect.core import IntrospectConfig, Introspector
from lightning_introspect.sinks.tensorboard import TensorBoardSink

EVERY, WARMUP = 2, 1


def sampled_steps(steps: int) -> list[int]:
    """Steps sampled with ``every_n_steps=2, warmup_steps=1`` (a fixed schedule: no overhead budget)."""
    return [s for s in range(steps) if s < WARMUP or s % EVERY == 0]


class GraphCounter:
    """A Dynamo backend that runs the traced graph as is and records which compiled graph each call ran."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls: list[int] = []  # graph number of each call since the last `take()`

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        number = self.graphs = self.graphs + 1

        def run(*args: Any) -> Any:
            self.calls.append(number)
            return gm.forward(*args)

        return run

    def take(self) -> list[int]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches and counters emptied before and after the test (they are per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    """Linear -> ReLU -> Linear with a forward of its own (Dynamo does not trace torch.nn's own code as a
    frame: ``nn.Sequential.compile()`` would compile nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenTagger(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear over (N, T) tokens: per-token logits (N, T, C)."""

    def __init__(self, vocab: int = 11, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb, self.proj = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.act, self.head = nn.ReLU(), nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.act(self.proj(self.emb(tokens))))


def run_loop(model: nn.Module, run: nn.Module, batches: list[tuple[Tensor, Tensor]], logdir: Path,
              counter: GraphCounter) -> list[list[int]]:
    """Trains ``run`` (``model`` or its compiled form) on ``batches`` with the core Introspector writing to
    ``logdir``; returns the compiled graphs each step ran."""
    intro = Introspector(run, IntrospectConfig(every_n_steps=EVERY, warmup_steps=WARMUP, histograms=False),
                         sinks=[TensorBoardSink(logdir)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ran = []
    for step, (x, y) in enumerate(batches):
        with intro.step(step):
            logits = run(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            intro.observe_gradients(opt)
            opt.step()
        ran.append(counter.take())
    intro.close()
    return ran


def check_steps(logdir: Path, steps: int, layers: list[str]) -> None:
    """Every layer's activation statistics and the gradient norm are logged at exactly the sampled steps."""
    events = read_events(logdir)
    expected = sampled_steps(steps)
    assert events.steps("grad_norm/global") == expected
    for layer in layers:
        assert events.steps(f"activation_mean/{layer}") == expected, layer
        assert events.steps(f"activation_std/{layer}") == expected, layer


def check_graphs(ran: list[list[int]], steps: int) -> None:
    """A sampled step runs no compiled graph (eager, so its hooks run); an unsampled one runs one whole graph."""
    sampled = set(sampled_steps(steps))
    for step, graphs in enumerate(ran):
        assert len(graphs) == (0 if step in sampled else 1), (step, graphs)


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_partial_batches_keep_activation_stats_on_every_sampled_step(how: str, tmp_path: Path,
                                                                     fresh_dynamo: None) -> None:
    """Test that a compiled model fed batches of 8, 8, 8, 3, ... (the 3 first seen on an unsampled step)
    logs activation statistics at every sampled step, as gradient norms, and compiles at most 2 frames."""
    counter = GraphCounter()
    torch.manual_seed(0)
    model = MLP()
    if how == "model.compile()":
        model.compile(backend=counter)
        run: nn.Module = model
    else:
        run = torch.compile(model, backend=counter)
    g = torch.Generator().manual_seed(0)
    sizes = [8, 8, 8, 3] * 3
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    ran = run_loop(model, run, batches, tmp_path, counter)
    check_steps(tmp_path, len(sizes), ["fc1", "act", "fc2"])
    check_graphs(ran, len(sizes))
    # One graph for batches of 8, one with a dynamic batch size after the 3: none for Introspect's hooks.
    assert counters["frames"]["total"] <= 2
    assert counter.graphs <= 2


def test_changing_sequence_length_keeps_activation_stats(tmp_path: Path, fresh_dynamo: None) -> None:
    """Test that a compiled token model fed sequences of changing length (new lengths on unsampled steps)
    logs activation statistics at every sampled step, through AOT autograd, with a bounded number of graphs."""
    counter = GraphCounter()
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_graphs(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        return make_boxed_func(counter(gm, example_inputs))

    def backward_graphs(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        return make_boxed_func(gm.forward)

    aot_counter = aot_autograd(fw_compiler=forward_graphs, bw_compiler=backward_graphs)
    torch.manual_seed(0)
    model = TokenTagger()
    run = torch.compile(model, backend=aot_counter)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 5, 5, 7, 5, 9, 9, 4, 6, 5, 7, 8]
    batches = [(torch.randint(0, 11, (4, t), generator=g), torch.randint(0, 3, (4, t), generator=g))
               for t in lengths]
    ran = run_loop(model, run, batches, tmp_path, counter)
    check_steps(tmp_path, len(lengths), ["proj", "act", "head"])
    check_graphs(ran, len(lengths))
    # Static length 5, then one graph dynamic in the length; the bound does not grow with the steps.
    assert counters["frames"]["total"] <= 2
    assert counter.graphs <= 2


def test_changing_shapes_without_introspect_compile_as_many_frames(fresh_dynamo: None) -> None:
    """Test the bound above is the model's own: without Introspect the same loop compiles as many frames."""
    torch.manual_seed(0)
    run = torch.compile(MLP(), backend="eager")
    for n in [8, 8, 8, 3] * 3:
        run(torch.randn(n, 6)).sum().backward()
    assert counters["frames"]["total"] == 2


class CompiledTinyNet(pl.LightningModule):
    """An MLP LightningModule; ``compile_net`` compiles its inner network (``self.net = torch.compile(net)``)."""

    def __init__(self, compile_net: bool) -> None:
        super().__init__()
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.net = torch.compile(net, backend="eager") if compile_net else net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y, _ = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits.detach()}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("how", ["submodule", "whole module"])
def test_trainer_with_compiled_module_and_partial_last_batch(how: str, tmp_path: Path, fresh_dynamo: None) -> None:
    """Test that a Trainer run whose model is compiled (a compiled submodule, or the LightningModule passed to
    `fit` compiled), over epochs of 8, 8, 8, 4 examples (the 4 unsampled), logs activation statistics at every
    sampled step, with the eager run's tags, and compiles at most 2 frames."""
    torch.manual_seed(0)
    model: Any = CompiledTinyNet(compile_net=how == "submodule")
    if how == "whole module":
        model = torch.compile(model, backend="eager")
    epochs, per_epoch = 3, 4
    steps = epochs * per_epoch
    intro = Introspect(every_n_steps=EVERY, warmup_steps=WARMUP, histograms=False)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, callbacks=[intro])).fit(
        model, loader(make_data(28), batch_size=8)
    )
    scalars = read_scalars(tmp_path / "run")
    expected = sampled_steps(steps)
    assert [s for s, _ in scalars["grad_norm/global"]] == expected
    for layer in ("net.0", "net.1", "net.2"):
        assert [s for s, _ in scalars[f"activation_mean/{layer}"]] == expected, layer
    assert not any("_orig_mod" in tag for tag in layer_tags(scalars))
    assert intro.core is not None and intro.core.records()["seen_epochs"].tolist() == [epochs] * 28
    assert 1 <= counters["frames"]["total"] <= 2
    assert math.isfinite(scalars["activation_mean/net.2"][-1][1])
