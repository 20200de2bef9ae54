"""Helpers of the Lightning callback that read the Trainer, its strategy, datasets and loggers."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from torch import nn

from .core.config import IntrospectConfig
from .core.samples import WithIndex


_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9_.\-]+")


def _check_arguments(*, name: Any, ids: Any, targets: Any, describe: Any) -> None:
    """Refuses, when the callback is made, a ``name``, ``ids``, ``targets`` or ``describe`` it cannot use."""
    if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError(
            f"`name` must be a non-empty string of letters, digits, '_', '-' or '.' (it becomes a folder), "
            f"got {name!r}."
        )
    for arg, key in (("ids", ids), ("targets", targets)):
        if not (key == "auto" or key is None or isinstance(key, (str, int)) or callable(key)):
            raise ValueError(f"`{arg}` must be 'auto', a tuple position, a dict key or a function, got {key!r}.")
    if describe is not None and not callable(describe):
        raise ValueError(f"`describe` must be a callable `describe(sample_id) -> str` or None, got {describe!r}.")


def _dir_taken_error(records_dir: Any) -> RuntimeError:
    """A new Trainer's fit that would start fresh records in the previous run's records dir, without resuming."""
    return RuntimeError(
        f"Introspect already wrote a run to {records_dir}, and this fit with a new Trainer would start "
        "fresh records there, over the first run's, and mix both runs' TensorBoard points. Give the new "
        "Trainer a log dir of its own (a new logger version, or `Introspect(log_dir=...)` without a "
        "TensorBoardLogger), resume that run with `fit(..., ckpt_path=...)`, or use a new Introspect."
    )


def _not_set_up() -> RuntimeError:
    return RuntimeError("Introspect is used before `setup`: attach it to a Trainer and call `fit`.")


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


def _with_index_in_parts(dataset: Any) -> bool:
    """Whether a concatenation (``ConcatDataset``: ``.datasets`` and ``.cumulative_sizes``) on the ``.dataset``
    chain holds a ``WithIndex`` inside one of its parts: each part's ids count from 0, so they collide."""
    seen = 0
    while dataset is not None and seen < 16:
        parts = getattr(dataset, "datasets", None)
        if hasattr(dataset, "cumulative_sizes") and isinstance(parts, (list, tuple)):
            return any(_find_dataset(p, WithIndex) is not None or _with_index_in_parts(p) for p in parts)
        dataset = getattr(dataset, "__dict__", {}).get("dataset")
        seen += 1
    return False


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


class SampleIdsPlan(NamedTuple):
    """How a fit finds its sample ids: whether it records per-example dynamics, where the ids are, the
    WithIndex's key, the number of examples the ids index and the AUM threshold samples, if any."""

    dynamics: bool
    id_key: Any
    index_key: Optional[str]
    num_examples: Optional[int]
    threshold_ids: Any


def _sample_ids_plan(loader: Any, cfg: IntrospectConfig, ids_key: Any) -> SampleIdsPlan:
    """Reads the training loader's dataset (through wrappers) for :class:`SampleIdsPlan`; raises when
    per-example dynamics are asked for and cannot be had."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None and isinstance(loader, (list, tuple)) and loader:
        dataset = getattr(loader[0], "dataset", None)
    wrapped = _find_dataset(dataset, WithIndex)
    from .core.threshold import ThresholdSamples  # noqa: PLC0415 (optional feature)

    ts = _find_dataset(dataset, ThresholdSamples)
    threshold_ids = ts.threshold_ids if ts is not None else None
    if cfg.sample_dynamics is not False and wrapped is None and ids_key == "auto" and _with_index_in_parts(dataset):
        raise ValueError(
            "the training set concatenates datasets wrapped in `WithIndex` (a `ConcatDataset` of them): each "
            "part's sample ids count from 0, so examples of different parts would share ids. Wrap the "
            "concatenation instead: `WithIndex(ConcatDataset([a, b]))`, or pass `ids=` to ids of your own."
        )
    dynamics, id_key = False, None
    if cfg.sample_dynamics is False:
        dynamics = False
    elif ids_key != "auto" and ids_key is not None:
        dynamics, id_key = True, ids_key
    elif wrapped is not None:
        dynamics, id_key = True, "auto"
    elif cfg.sample_dynamics:
        raise ValueError(
            "Introspect(sample_dynamics=True) found no sample ids: wrap the training set as "
            "`WithIndex(dataset)`, or pass `ids=` (a tuple position, dict key or function of the batch)."
        )
    index_key = wrapped.key if wrapped is not None else None
    n = None
    if dynamics:
        # The store is sized by the dataset whose positions are the ids: the WithIndex, also when a split or
        # Subset of it is trained on (its ids then reach past len(the split); the examples left out are
        # never seen, so they are neither ranked nor counted in any share).
        n = cfg.num_examples
        if n is None and dataset is not None:
            n = _len_or_none(dataset)
            if wrapped is not None:
                n = len(wrapped) if id_key == "auto" or n is None else max(n, len(wrapped))
        if n is None:
            raise ValueError(
                "Introspect needs the number of training examples for per-example dynamics, and the dataset "
                "has no len(): pass `num_examples=` (sample ids must lie in [0, num_examples))."
            )
    return SampleIdsPlan(dynamics, id_key, index_key, n, threshold_ids)
