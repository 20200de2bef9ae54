"""The only place that tells ``lightning.pytorch`` from ``pytorch_lightning``.

``Introspect`` derives from the ``Callback`` class of every Lightning package that is installed, so one
instance is accepted by either package's ``Trainer``.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _try(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


LIGHTNING_MODULES: tuple[ModuleType, ...] = tuple(m for m in map(_try, _PACKAGES) if m is not None)
if not LIGHTNING_MODULES:
    raise ImportError(
        "lightning_introspect.Introspect needs `pytorch-lightning` or `lightning` (pip install pytorch-lightning). "
        "The torch-only core works without it: `from lightning_introspect.core import Introspector`."
    )

CALLBACK_BASES: tuple[type, ...] = tuple(m.Callback for m in LIGHTNING_MODULES)


def is_tensorboard_logger(logger: Any) -> bool:
    for m in LIGHTNING_MODULES:
        if isinstance(logger, m.loggers.TensorBoardLogger):
            return True
    return False
