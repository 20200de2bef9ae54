"""Helpers of the Lightning callback that read the Trainer, its strategy, datasets and loggers."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn


def _clips_gradients(trainer: Any, pl_module: Any) -> bool:
    """Whether Lightning may clip the gradients after ``on_before_optimizer_step``: automatic optimization with
    a positive ``gradient_clip_val``, or a module that overrides ``configure_gradient_clipping`` (its own rule)."""
    if not getattr(pl_module, "automatic_optimization", True):
        return False  # manual optimization: Lightning does not clip (the user clips before stepping)
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val is not None and clip_val > 0:
        return True
    owner = next((c for c in type(pl_module).__mro__ if "configure_gradient_clipping" in vars(c)), None)
    return owner is not None and not (
        owner.__name__ == "LightningModule" and owner.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
    )


def _find_dataset(dataset: Any, cls: type) -> Any:
    """Looks through wrapper datasets (``.dataset`` chains, e.g. Subset, WithIndex) for an instance of cls."""
    seen = 0
    while dataset is not None and seen < 16:
        if isinstance(dataset, cls):
            return dataset
        dataset = getattr(dataset, "__dict__", {}).get("dataset")
        seen += 1
    return None


#: Strategies whose parameters the callback cannot read: FSDP1 flattens and shards them into FlatParameters,
#: DeepSpeed (ZeRO) partitions them and keeps gradients in its own buffers. Names, as deepspeed may be absent.
_UNSUPPORTED_STRATEGIES = {"FSDPStrategy": "FSDP1", "DeepSpeedStrategy": "DeepSpeed"}


def _check_strategy(trainer: Any) -> None:
    """Refuses, at setup, a strategy whose gradient norms would come out wrong or missing."""
    names = [cls.__name__ for cls in type(getattr(trainer, "strategy", None)).__mro__]
    found = next((n for n in names if n in _UNSUPPORTED_STRATEGIES), None)
    if found is not None:
        raise ValueError(
            f"Introspect does not support Lightning's `{found}` ({_UNSUPPORTED_STRATEGIES[found]}): it flattens and "
            "partitions the parameters and their gradients, so the gradient norms would be wrong or missing. Shard "
            "with FSDP2 instead (`strategy=ModelParallelStrategy()` and `fully_shard` in `configure_model`), or train "
            "with `strategy=\"ddp\"`."
        )


def _forward_to(loggers: Sequence[Any], name: Optional[str]) -> Callable[[dict[str, float], int], None]:
    """Sends host scalars to Lightning loggers (on the training thread, after they were written); a named
    callback's tags start with ``<name>/``, so that two callbacks' scalars stay apart in one logger."""

    def on_scalars(scalars: dict[str, float], step: int) -> None:
        if name is not None:
            scalars = {f"{name}/{tag}": value for tag, value in scalars.items()}
        for lg in loggers:
            lg.log_metrics(scalars, step)

    return on_scalars


def _runs_own_forward(module: nn.Module) -> bool:
    """Whether a call of ``module`` runs its own ``forward``: a method bound to it, possibly under decorators
    that keep ``__wrapped__`` (``torch.compile``), and not a function a strategy put in its place."""
    fwd: Any = module.forward
    for _ in range(8):
        if getattr(fwd, "__self__", None) is module:
            return True
        fwd = getattr(fwd, "__wrapped__", None)
        if fwd is None:
            return False
    return False


def _len_or_none(dataset: Any) -> Optional[int]:
    try:
        return len(dataset)
    except TypeError:
        return None


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"lightning_introspect cannot write to {directory} ({err.strerror or err}). Give the Trainer a writable "
            "`default_root_dir` (or the logger a writable `save_dir`), or pass `Introspect(log_dir=...)`."
        ) from err
