"""The only place that tells ``lightning.pytorch`` from ``pytorch_lightning``.

``Introspect`` derives from the ``Callback`` class of each Lightning package the program has already
imported, or, when it has imported none yet, of every one that is installed: either package's ``Trainer``
accepts it, and a program that uses ``lightning.pytorch`` does not pay for a second copy of Lightning
(``pytorch_lightning`` and ``lightning_fabric``: about 7 MB of memory) that it never uses.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _try(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _lightning_modules() -> tuple[ModuleType, ...]:
    imported = tuple(sys.modules[name] for name in _PACKAGES if name in sys.modules)
    if imported:
        return imported
    return tuple(m for m in map(_try, _PACKAGES) if m is not None)


LIGHTNING_MODULES: tuple[ModuleType, ...] = _lightning_modules()
if not LIGHTNING_MODULES:
    raise ImportError(
        "lightning_introspect.Introspect needs `pytorch-lightning` or `lightning` (pip install pytorch-lightning). "
        "The torch-only core works without it: `from lightning_introspect.core import Introspector`."
    )

CALLBACK_BASES: tuple[type, ...] = tuple(m.Callback for m in LIGHTNING_MODULES)


def is_tensorboard_logger(logger: Any) -> bool:
    """Whether ``logger`` is the ``TensorBoardLogger`` of a Lightning package imported by now (a program may
    import a second one after this module)."""
    for name in _PACKAGES:
        module = sys.modules.get(name)
        if module is not None and isinstance(logger, module.loggers.TensorBoardLogger):
            return True
    return False
