"""Tiny models with answers known in closed form, and a BoringModel-style LightningModule for both packages.

- :class:`DeadUnitNet`: captum's ``BasicModel_MultiLayer`` idea: ``Linear(3, 4)`` with all weights 1 and bias
  ``(-10, 1, 1, 1)``, then ReLU. For inputs in ``[0, 1)`` unit 0's pre-activation is below ``3 - 10 = -7``
  and the others' above 1, so exactly one unit of four is dead (dead fraction 0.25) in both layers.
- :class:`ReusedNet`: one ``Linear`` called twice in one forward (captum's ``BasicModelWithReusedModules``).
- :class:`TupleDictNet`: layers that return a tuple and a dict (their first tensor is the output watched).
- :func:`classifier`: a LightningModule class for ``lightning.pytorch`` or ``pytorch_lightning`` with a
  NaN "poison" switch in the middle of its network and a probe called inside ``training_step``.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

#: Both Lightning packages; tests parametrize over them.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")

#: Bias of :class:`DeadUnitNet`: unit 0 can never fire for inputs in [0, 1).
DEAD_BIAS = (-10.0, 1.0, 1.0, 1.0)


def lightning(package: str) -> ModuleType:
    """``lightning.pytorch`` or ``pytorch_lightning``, imported by name."""
    return importlib.import_module(package)


class DeadUnitNet(nn.Module):
    """``Linear(3, 4)`` (weights 1, bias ``(-10, 1, 1, 1)``) then ReLU: one dead unit of four for x in [0, 1).

    Args:
        inplace: use ``ReLU(inplace=True)`` (it overwrites the Linear's output tensor).
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.relu = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.linear.weight.fill_(1.0)
            self.linear.bias.copy_(torch.tensor(DEAD_BIAS))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.linear(x))


def unit_inputs(n: int, generator: torch.Generator) -> Tensor:
    """``(n, 3)`` inputs uniform in [0, 1)."""
    return torch.rand(n, 3, generator=generator)


class ReusedNet(nn.Module):
    """``relu(linear(relu(linear(x))))`` with ONE ``Linear(3, 3)`` module: the layer fires twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.linear(self.relu(self.linear(x))))

    @torch.no_grad()
    def linear_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two outputs of ``linear`` in one forward, computed by hand."""
        first = self.linear(x)
        return first, self.linear(torch.relu(first))


class TupleLinear(nn.Linear):
    """A Linear that returns ``(output, output.sum())``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        y = super().forward(x)
        return y, y.sum()


class DictLinear(nn.Linear):
    """A Linear that returns ``{"out": output, "aux": 2 * output}``."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        y = super().forward(x)
        return {"out": y, "aux": 2 * y}


class TupleDictNet(nn.Module):
    """A tuple-returning layer feeding a dict-returning layer."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = TupleLinear(3, 5)
        self.named = DictLinear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.pair(x)
        return self.named(y)["out"]


class Poison(nn.Module):
    """Identity, or all-NaN output while ``armed`` (a module type no default selection watches)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, x: Tensor) -> Tensor:
        return x * float("nan") if self.armed else x


def mlp(in_features: int = 8, hidden: int = 16, num_classes: int = 4) -> nn.Sequential:
    """``net.0`` Linear, ``net.1`` ReLU, ``net.2`` Poison, ``net.3`` Linear, ``net.4`` ReLU, ``net.5`` Linear."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), Poison(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


#: Names of the watched layers of :func:`mlp`, in forward order.
MLP_LAYERS = ("net.0", "net.1", "net.3", "net.4", "net.5")


def classification_data(n: int = 64, in_features: int = 8, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    """A learnable ``(x, y)`` dataset: ``y = argmax(x @ W)`` for a fixed random ``W``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    w = torch.randn(in_features, num_classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def loader(dataset: Any, batch_size: int = 8) -> DataLoader:
    """An unshuffled loader (deterministic step contents)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@lru_cache(maxsize=None)
def _classifier_class(package: str) -> type:
    pl = lightning(package)

    class BoringClassifier(pl.LightningModule):  # type: ignore[name-defined,misc]
        """:func:`mlp` trained with SGD on ``(x, y[, index])`` batches."""

        def __init__(
            self,
            *,
            return_logits: bool = True,
            poison_steps: tuple[int, ...] = (),
            probe: Optional[Callable[[Any], None]] = None,
            lr: float = 0.1,
        ) -> None:
            super().__init__()
            self.net = mlp()
            self.return_logits = return_logits
            self.poison_steps = set(poison_steps)
            self.probe = probe
            self.lr = lr

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch[0], batch[1]
            if self.probe is not None:
                self.probe(self)
            self.net[2].armed = self.global_step in self.poison_steps
            logits = self(x)
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "logits": logits.detach()} if self.return_logits else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    BoringClassifier.__qualname__ = BoringClassifier.__name__ = f"BoringClassifier_{package.replace('.', '_')}"
    return BoringClassifier


def classifier(package: str = "lightning.pytorch", **kwargs: Any) -> Any:
    """A BoringModel-style LightningModule of ``package`` (see ``_classifier_class`` for ``kwargs``)."""
    return _classifier_class(package)(**kwargs)


def trainer(package: str, root: Path, *, logger: Any = "tensorboard", **kwargs: Any) -> Any:
    """A small CPU ``Trainer`` of ``package``: no progress bar, summary, checkpoints or sanity checks.

    ``logger="tensorboard"`` gives a real ``TensorBoardLogger(root, name="", version=0)`` writing to
    ``root/version_0`` (no default ``hp_metric``); pass ``False``, a logger or a list to override.
    """
    pl = lightning(package)
    if logger == "tensorboard":
        logger = pl.loggers.TensorBoardLogger(str(root), name="", version=0, default_hp_metric=False)
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, default_root_dir=str(root), logger=logger, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
