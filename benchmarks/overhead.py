"""Step-time and memory overhead of ``Introspect`` against a bare run, in one process, through a real Trainer.

Run (about 35 minutes on a shared 2-core CPU, five budget runs included; ``--quick`` about 3)::

    python benchmarks/overhead.py                  # all workloads and configurations, markdown on stdout
    python benchmarks/overhead.py --quick          # 4 configurations, a quarter of the steps: a smoke check
    python benchmarks/overhead.py --out benchmarks/RESULTS.md   # also write the report there
    python benchmarks/overhead.py --device cuda    # synchronizes around every timed step (untested here)

Workloads (synthetic data from a seeded ``torch.Generator``; the labels come from a random teacher, so the
models learn): an MLP 784-512-512-10 at batch 128; a small residual CNN (stride-2 stem, 16/32 channels, two residual blocks)
on 3x32x32 at batch 64; a Transformer encoder classifier (4 layers, d_model 128, 4 heads, feed-forward 256, batch 32, 16 tokens).
Each runs on ``torch.set_num_threads(1)`` through a ``lightning.pytorch.Trainer`` with a TensorBoardLogger,
the training set wrapped in ``WithIndex`` (so the default ``Introspect()`` runs per-example dynamics too).

Configurations, each compared against bare blocks of the same run:

* ``bare again (A/A control)``: blocks that do nothing, measured like every configuration: their ratio and
  spread are this run's noise floor (an "unsampled" ratio within it is indistinguishable from bare);
* ``defaults``: ``Introspect()`` (every 50 steps, per-example dynamics on every step);
* ``defaults, no ids``: ``Introspect(sample_dynamics=False)`` (as if the dataset were not wrapped);
* ``unsampled only, no ids``: blocks that contain no sampled step (hooks never attached) and no per-example
  dynamics: what ``Introspect`` costs on the steps it does not sample (per-example dynamics, which run on
  every step, cost the difference between ``defaults`` and ``defaults, no ids``);
* ``everything, every step``: ``every_n_steps=1, warmup_steps=0``, histograms, ``param_grad_norms=True``,
  dead units, update ratios, per-example dynamics;
* ``budget 1 %`` / ``budget 5 %``: ``Introspect(overhead_budget=0.01 / 0.05)``, measured in a run of their
  own with more steps (``BUDGET_STEPS``, with its own A/A control): a budget needs many sampled steps after
  warm-up to be measured to a point;
* anchors: Lightning's ``grad_norm`` logged every step as in its docs
  (``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``), and "naive" per-layer
  forward hooks that call ``.item()`` on mean and std every step and write them with a ``SummaryWriter``
  (fastai's ``ActivationStats`` style).

Method. The machine is shared and noisy, so every configuration is measured in ONE process on ONE model and
Trainer per workload: training runs in blocks of 10 steps in the order ``off, c1, off, c2, ..., off, cN``,
repeated with the order reversed every other round. In an "on" block a switch callback forwards the
Trainer's hooks to that configuration's own ``Introspect`` (or turns the anchor on), which sees its own step
count, so its warm-up, sampling interval and budget run as in a real fit; in an "off" block it forwards
nothing: no hook is attached and no per-step work is done. A step is timed from the first callback's
``on_train_batch_start`` to the last callback's ``on_train_batch_end`` (data loading and epoch ends are
outside; the flush of a sampled step happens at the next step's start, inside). The background writer runs
during the steps; a block of an ``Introspect`` configuration goes on for up to 3 more steps while its writer
still works, and what is left is drained at the switch, timed, and added to the block's last step (the
drain runs alone, so this errs on the costly side). Each "on" step is taken relative to the median bare
step of the bare blocks right before and after its block (local pairing: the machine's load drifts over
seconds). The ratio pools each configuration's steps after its first block: per kind of step (sampled; the
next one, which carries its flush; later ones that start while the writer still works; the rest) the count
times the median relative time of that kind, over their number; the spread is the same ratio in each
quarter of the run. Also given: the time spent inside the callback
(wall time of the forwarded calls) and inside forward hooks (forward time of sampled steps minus the median
forward time of unsampled ones) as a share of the configuration's step time. Epoch ends (per-example
folding, records and the data map, written by the background thread) are drained and timed separately,
once per epoch; their mean is given (the data map is redrawn at some epoch ends only). Peak memory: bare
and defaults each train one epoch in a fresh subprocess, which makes the data set and the model first,
hands freed heap pages back (``malloc_trim``: else the start state, and the rise from it, vary by up to
100 MB between processes), resets its peak RSS (``/proc/self/clear_refs``),
then imports and builds the callback and trains; it reports the rise of ``VmHWM`` (peak RSS,
``/proc/self/status``) at the end of training and after ``fit``. Budget mode: the achieved slowdown is the
pooled ratio over the steps after the first third of its run; the interval is the one the schedule chose by
the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from memory import proc_status, reset_peak, trim_heap  # noqa: E402  (benchmarks/memory.py: /proc/self, malloc_trim)

NUM_CLASSES = 10
BLOCK = 50  # the default every_n_steps; an epoch is 4 * BLOCK steps
STEP_BLOCK = 10  # steps per on/off block: short, so that on and off see the same load from other jobs
# On steps per configuration (as many bare ones): at least 8 sampled steps at the default interval of 50 (with
# 200 the CNN's and the Transformer's defaults had 3 after their warm-up block, one per quarter of the run).
STEPS = {"mlp": 500, "cnn": 400, "transformer": 400}
BUDGET_STEPS = {"mlp": 1000, "cnn": 700, "transformer": 500}  # the budget runs: many sampled steps after warm-up
BUDGET_REPEATS = 5  # separate budget runs: the figure is their median (a single run scatters by up to 3 points)


# ------------------------------------------------------------------------------------------------ workloads
class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), ResidualBlock(16),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), ResidualBlock(32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NUM_CLASSES),
    )


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 1000, seq_len: int = 16, d_model: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=2 * d_model, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


@dataclass(frozen=True)
class Workload:
    name: str
    batch_size: int
    make_model: Callable[[], nn.Module]
    make_inputs: Callable[[int, torch.Generator], Tensor]


def _images(n: int, g: torch.Generator) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=g)


def _tokens(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 1000, (n, 16), generator=g)


WORKLOADS = {
    "mlp": Workload("MLP 784-512-512-10, batch 128", 128,
                    lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)),
                    lambda n, g: torch.randn(n, 784, generator=g)),
    "cnn": Workload("residual CNN 3x32x32, batch 64", 64, make_cnn, _images),
    "transformer": Workload("Transformer encoder 4x128, batch 32, seq 16", 32, TokenClassifier, _tokens),
}


def make_dataset(workload: Workload, steps_per_epoch: int, seed: int = 0) -> TensorDataset:
    """Synthetic inputs; labels = argmax of a seeded random teacher network (learnable, about balanced)."""
    g = torch.Generator().manual_seed(seed)
    x = workload.make_inputs(steps_per_epoch * workload.batch_size, g)
    torch.manual_seed(seed + 1)
    teacher = workload.make_model().eval()
    with torch.no_grad():
        y = torch.cat([teacher(x[i : i + 512]).argmax(-1) for i in range(0, len(x), 512)])
    return TensorDataset(x, y)


class BenchModule(pl.LightningModule):
    """A plain user module: ``training_step`` returns the loss only (logits are captured from ``forward``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.anchor_grad_norm = False
        self.last_forward_s = 0.0
        self.sync_cuda = False

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        if self.sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = self(x)
        if self.sync_cuda:
            torch.cuda.synchronize()
        self.last_forward_s = time.perf_counter() - t0
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.anchor_grad_norm:  # Lightning's documented recipe
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


# ------------------------------------------------------------------------------------------------ configurations
def introspect_kwargs(config: str) -> Optional[dict[str, Any]]:
    """Keyword arguments of ``Introspect`` for a configuration; None for the anchors."""
    return {
        "defaults": {},
        "defaults, no ids": {"sample_dynamics": False},
        "unsampled only, no ids": {"every_n_steps": 10**9, "warmup_steps": 0, "sample_dynamics": False},
        "everything, every step": {
            "every_n_steps": 1, "warmup_steps": 0, "histograms": True, "param_grad_norms": True,
            "dead_units": True, "update_ratios": True, "activations": True, "grad_norms": True,
        },
        "budget 1 %": {"overhead_budget": 0.01},
        "budget 5 %": {"overhead_budget": 0.05},
    }.get(config)


AA = "bare again (A/A control)"
BUDGETS = ["budget 1 %", "budget 5 %"]
CONFIGS = [AA, "defaults", "defaults, no ids", "unsampled only, no ids", "everything, every step", *BUDGETS,
           "anchor: Lightning grad_norm", "anchor: naive .item() hooks"]
QUICK_CONFIGS = [AA, "defaults", "unsampled only, no ids", "everything, every step", "budget 5 %"]
TARGETS = {  # (workload, config) -> maximum median ratio
    ("cnn", "defaults"): 1.02, ("transformer", "defaults"): 1.02, ("mlp", "defaults"): 1.05,
    ("cnn", "everything, every step"): 1.25, ("transformer", "everything, every step"): 1.25,
}
MEMORY_TARGET_MB = 30.0
MEMORY_REPEATS = 5  # fresh processes per configuration: their peaks still vary by several MB
_WATCHED = (nn.Linear, nn.Conv2d, nn.ReLU)


class NaiveActivationStats(pl.Callback):
    """The anchor: forward hooks that read mean/std with ``.item()`` every step and write them right away."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)
        self.handles: list[Any] = []
        self.step = 0

    def attach(self, module: nn.Module) -> None:
        for name, m in module.named_modules():
            if isinstance(m, _WATCHED):
                self.handles.append(m.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            out = output.detach()
            self.writer.add_scalar(f"{name}/mean", out.mean().item(), self.step)
            self.writer.add_scalar(f"{name}/std", out.std().item(), self.step)

        return hook


class _TrainerView:
    """The Trainer as one configuration sees it: its own step count (it only runs in its own blocks)."""

    def __init__(self, trainer: Any, step: int) -> None:
        self._trainer = trainer
        self.global_step = step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


class Switch(pl.Callback):
    """Forwards the Trainer's hooks to the active configuration's ``Introspect`` and times the forwarded calls.

    Each configuration sees its own step count (``global_step`` of a :class:`_TrainerView`), so its run
    looks contiguous to it: warm-up, sampling interval and budget measurements as in a real fit. With
    nothing active the switch does nothing, so an "off" step is a bare step (no hooks, no per-step work).
    """

    def __init__(self, instances: dict[str, Any]) -> None:
        self.instances = instances
        self.steps = {name: 0 for name in instances}
        self.active: Optional[str] = None
        self.callback_s = 0.0
        self.epoch_end_s: list[float] = []
        self._views: dict[str, _TrainerView] = {}
        # The active instance and its view of the Trainer, set at each step's start: the forwarding costs the
        # "on" steps two attribute reads and two clock reads per hook, about what Lightning's own dispatch of
        # a callback's hook costs (which a bare step pays here too, to this switch).
        self._inst: Any = None
        self._view: Any = None

    def activate(self, name: Optional[str]) -> None:
        if self.active is not None and name != self.active:
            inst = self.instances[self.active]
            inst._remove_capture_hook()  # a bare block runs with no hook of the tool on the module
            if inst.core is not None:
                inst.core.writer.drain()
        if name in self.instances and name != self.active:
            self.instances[name].core.schedule.pause()  # the gap since its last block is not a step of its own
        self.active = name if name in self.instances else None
        self._inst = None if self.active is None else self.instances[self.active]

    def _view_of(self, trainer: Any) -> Any:
        """The active configuration's view of the Trainer, its step count set."""
        assert self.active is not None
        view = self._views.get(self.active)
        if view is None or view._trainer is not trainer:
            view = self._views[self.active] = _TrainerView(trainer, 0)
        view.global_step = self.steps[self.active]
        return view

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for inst in self.instances.values():
            inst.setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        for inst in self.instances.values():
            inst.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        inst = self._inst
        if inst is not None:
            t0 = time.perf_counter()
            view = self._view = self._view_of(trainer)
            inst.on_train_batch_start(view, pl_module, batch, batch_idx)
            self.callback_s += time.perf_counter() - t0

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        inst = self._inst
        if inst is not None:
            t0 = time.perf_counter()
            inst.on_before_backward(self._view, pl_module, loss)
            self.callback_s += time.perf_counter() - t0

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        inst = self._inst
        if inst is not None:
            t0 = time.perf_counter()
            inst.on_after_backward(self._view, pl_module)
            self.callback_s += time.perf_counter() - t0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        inst = self._inst
        if inst is not None:
            t0 = time.perf_counter()
            inst.on_before_optimizer_step(self._view, pl_module, optimizer)
            self.callback_s += time.perf_counter() - t0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        inst = self._inst
        if inst is not None:
            t0 = time.perf_counter()
            inst.on_train_batch_end(self._view, pl_module, outputs, batch, batch_idx)
            self.callback_s += time.perf_counter() - t0
            self.steps[self.active] += 1  # type: ignore[index]

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        for name, inst in self.instances.items():
            if inst.core is not None and inst._dynamics and self.steps[name] > 0:
                t0 = time.perf_counter()
                inst.on_train_epoch_end(_TrainerView(trainer, self.steps[name]), pl_module)
                inst.core.writer.drain()  # its background work is timed here, not spilled into the next steps
                if name == "defaults":
                    self.epoch_end_s.append(time.perf_counter() - t0)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for inst in self.instances.values():
            inst.teardown(trainer, pl_module, stage)


@dataclass
class Step:
    config: Optional[str]  # None = off
    own_step: int  # the configuration's own step count (its warm-up is left out of the figures)
    segment: int  # which quarter of the run
    seconds: float
    forward_s: float
    sampled: bool
    callback_s: float
    kind: str = "plain"  # sampled, after (flushes the sampled one), tail (the writer still works), plain
    ref: float = float("nan")  # median bare step of the bare blocks right before and after this step's block

    @property
    def relative(self) -> float:
        return self.seconds / self.ref


class Controller(pl.Callback):
    """First callback: switches configurations at block starts and starts each step's clock.

    A block of an ``Introspect`` configuration goes on past its planned length while that configuration's
    writer thread still works (at most ``MAX_EXTEND`` steps), so that its writing slows its own steps as in
    a real run; whatever is still queued then is drained at the switch and the drain's time is added to the
    block's last step (serially, an upper bound of what it would cost running alongside training)."""

    MAX_EXTEND = 3

    def __init__(self, plan: list[Optional[str]], block: int, switch: Switch, naive: NaiveActivationStats,
                 sync_cuda: bool) -> None:
        self.plan, self.block, self.switch, self.naive, self.sync_cuda = plan, block, switch, naive, sync_cuda
        self.config: Optional[str] = None
        self.anchor_steps: dict[str, int] = {}
        self.t0 = 0.0
        self.position, self.left, self.extended = -1, 0, 0
        self.kind = "plain"
        self.tail: Optional["Tail"] = None

    @property
    def block_index(self) -> int:
        return max(self.position, 0)

    def _core(self) -> Any:
        inst = self.switch.instances.get(self.config or "")
        return None if inst is None else inst.core

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        core = self._core()
        if self.left == 0:
            if core is not None and self.extended < self.MAX_EXTEND and core.writer.busy():
                self.left, self.extended = 1, self.extended + 1
            else:
                self.position += 1
                self.left, self.extended = self.block, 0
                config = self.plan[self.position] if self.position < len(self.plan) else None
                if config != self.config:
                    self.naive.detach()
                    pl_module.anchor_grad_norm = config == "anchor: Lightning grad_norm"
                    if config == "anchor: naive .item() hooks":
                        self.naive.attach(pl_module.net)
                    t0 = time.perf_counter()
                    self.switch.activate(config)  # drains what the last configuration still has queued
                    if core is not None and self.tail is not None and self.tail.steps:
                        self.tail.steps[-1].seconds += time.perf_counter() - t0
                    self.config = config
                    core = self._core()
        self.left -= 1
        self.kind = "plain" if core is None else "after" if core._pending is not None else (
            "tail" if core.writer.busy() else "plain")
        self.naive.step = step
        self.switch.callback_s = 0.0
        if self.sync_cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()


class Tail(pl.Callback):
    """Last callback: stops each step's clock and records the step."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.steps: list[Step] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.c.sync_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.c.t0
        c, sw = self.c.config, self.c.switch
        if c in sw.instances:
            own, sampled = sw.steps[c] - 1, bool(sw.instances[c].core.sampled)
        else:
            own = self.c.anchor_steps.get(c or "", 0)
            self.c.anchor_steps[c or ""] = own + 1
            sampled = c == "anchor: naive .item() hooks"
        segment = 4 * self.c.block_index // len(self.c.plan)
        kind = "sampled" if sampled else self.c.kind
        self.steps.append(Step(c, own, min(segment, 3), dt, pl_module.last_forward_s, sampled, sw.callback_s, kind))


def make_plan(configs: list[str], steps_per_config: int, block: int, burn_in: int) -> list[Optional[str]]:
    """Blocks: burn-in off blocks, then off c1 off c2 ... off cN, repeated (order reversed every other round)."""
    plan: list[Optional[str]] = [None] * burn_in
    for r in range(max(steps_per_config // block, 1)):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            plan += [None, c]
    return plan


# ------------------------------------------------------------------------------------------------ timing run
def quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


KINDS = ("sampled", "after", "tail", "plain")


def robust_total(steps: list[Step], value: Callable[[Step], float]) -> float:
    """Sum of ``value`` over these steps, robust to bursts of load from other jobs: per kind of step (sampled;
    the next one, which carries its flush; later ones while the writer thread still works; the rest) the count
    times the median of that kind. A kind with at most 5 steps enters with its plain sum."""
    total = 0.0
    for kind in KINDS:
        xs = [value(s) for s in steps if s.kind == kind]
        if xs:
            total += sum(xs) if len(xs) <= 5 else len(xs) * statistics.median(xs)
    return total


def slowdown(on: list[Step]) -> float:
    """Pooled step time of ``on`` relative to bare: each step over the median bare step of the bare blocks
    right before and after its own block (local pairing, so that the machine's load, which drifts over
    seconds, is the same in numerator and denominator)."""
    on = [s for s in on if math.isfinite(s.ref)]
    return robust_total(on, lambda s: s.relative) / len(on) if on else float("nan")


def pair_with_bare_neighbours(steps: list[Step]) -> None:
    """Sets each on step's ``ref``: the median time of the bare steps in the bare blocks adjacent to its block."""
    runs: list[tuple[Optional[str], list[Step]]] = []
    for s in steps:
        if runs and runs[-1][0] == s.config:
            runs[-1][1].append(s)
        else:
            runs.append((s.config, [s]))
    for i, (config, run) in enumerate(runs):
        if config is None:
            continue
        near = [s.seconds for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j][0] is None for s in runs[j][1]]
        ref = statistics.median(near) if near else float("nan")
        for s in run:
            s.ref = ref


def time_workload(key: str, configs: list[str], steps_per_config: int, block: int, device: str,
                  root: Path) -> dict[str, Any]:
    from lightning_introspect import Introspect, WithIndex

    workload = WORKLOADS[key]
    torch.manual_seed(0)
    steps_per_epoch = 4 * BLOCK
    data = WithIndex(make_dataset(workload, steps_per_epoch))
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(data, batch_size=workload.batch_size, shuffle=True, generator=g, drop_last=True)
    torch.manual_seed(0)
    module = BenchModule(workload.make_model())
    module.sync_cuda = device == "cuda"
    instances = {c: Introspect(**kw) for c in configs if (kw := introspect_kwargs(c)) is not None}
    switch = Switch(instances)
    naive = NaiveActivationStats(str(root / f"{key}-naive"))
    burn_in = max(2, 30 // block)
    plan = make_plan(configs, steps_per_config, block, burn_in)
    controller = Controller(plan, block, switch, naive, device == "cuda")
    tail = Tail(controller)
    controller.tail = tail
    extra = sum(c in instances for c in plan) * Controller.MAX_EXTEND  # room for extended blocks
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=len(plan) * block + extra,
        max_epochs=10**6, callbacks=[controller, switch, tail],
        logger=TensorBoardLogger(str(root), name=key), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - t0
    naive.writer.close()
    steps = tail.steps[burn_in * block :]
    pair_with_bare_neighbours(steps)
    off = [s for s in steps if s.config is None]
    rows = {}
    for c in configs:
        on = [s for s in steps if s.config == c and s.own_step >= block]  # its first block: warm-up, left out
        if not on:
            continue
        segs = [slowdown([s for s in on if s.segment == k]) for k in range(4)]
        segs = [r for r in segs if math.isfinite(r)]
        fwd_cold = [s.forward_s for s in on if not s.sampled] or [s.forward_s for s in off]
        base_fwd = statistics.median(fwd_cold)
        total = sum(s.seconds for s in on)
        q1, _, q3 = quartiles(segs)
        row: dict[str, Any] = {
            "ratio": slowdown(on), "q1": q1, "q3": q3, "min": min(segs), "max": max(segs), "n": len(on),
            "on_ms": robust_total(on, lambda s: s.seconds) / len(on) * 1e3, "sampled": sum(s.sampled for s in on),
            "callback": sum(s.callback_s for s in on) / total,
            "hooks": sum(max(s.forward_s - base_fwd, 0.0) for s in on if s.sampled) / total,
        }
        inst = instances.get(c)
        if inst is not None and inst.config.overhead_budget is not None:
            cut = max(s.own_step for s in on) // 3
            later = [s for s in on if s.own_step >= cut]
            row["budget"] = inst.config.overhead_budget
            row["aggregate"] = slowdown(later)
            row["interval"] = inst.core.schedule.interval
            row["estimate"] = inst.core.schedule.expected_overhead()
            row["floor"] = inst.core.schedule.always_on()
        rows[c] = row
    return {"key": key, "name": workload.name, "off_ms": statistics.median(s.seconds for s in off) * 1e3,
            "rows": rows, "wall_s": wall, "block": block,
            "epoch_ends_ms": [t * 1e3 for t in switch.epoch_end_s], "steps_per_epoch": steps_per_epoch}


# ------------------------------------------------------------------------------------------------ memory
def memory_child(key: str, config: str, steps: int, device: str, root: str) -> None:
    """Runs in a fresh process: trains ``steps`` steps with one configuration, prints its peak RSS as JSON.

    The data set and the model are made first, the same in every configuration, and the peak is reset after
    them: their transient allocations (the synthetic images alone are 150 MB) made the bare run's peak vary by
    30-40 MB between processes. Freed heap pages are then handed back to the system (``malloc_trim``) before the
    peak is reset: without it the start state is random (resident memory 572-672 MB at that point on the CNN
    between processes, the same configuration) and so is the rise from it. What is measured is the rise from
    there (import of the tool included) to the peak during training and to the peak at the end of ``fit``."""
    torch.set_num_threads(1)
    workload = WORKLOADS[key]
    steps_per_epoch = 4 * BLOCK
    from lightning_introspect.core.samples import WithIndex  # the core: no Lightning, no TensorBoard

    data = WithIndex(make_dataset(workload, steps_per_epoch))
    loader = DataLoader(data, batch_size=workload.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(1), drop_last=True)
    torch.manual_seed(0)
    module = BenchModule(workload.make_model())
    trim_heap()
    base = proc_status()["VmRSS"] / 2**20 if reset_peak() else 0.0
    callbacks: list[Any] = []
    if config != "bare":
        from lightning_introspect import Introspect

        callbacks.append(Introspect(**(introspect_kwargs(config) or {})))
    peak: dict[str, float] = {}

    class Peak(pl.Callback):
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            peak["train"] = proc_status()["VmHWM"] / 2**20 - base
            if device == "cuda":
                peak["cuda"] = torch.cuda.max_memory_allocated() / 2**20

    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, callbacks=[*callbacks, Peak()],
        logger=TensorBoardLogger(root, name=f"mem-{key}"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    peak["after_fit"] = proc_status()["VmHWM"] / 2**20 - base
    peak["base"] = base
    print(json.dumps(peak))


def measure_memory(key: str, configs: list[str], steps: int, device: str, root: Path,
                   repeats: int = MEMORY_REPEATS) -> dict[str, dict[str, float]]:
    """Peak RSS per configuration: ``repeats`` fresh processes each, interleaved (bare, c1, ..., bare, c1,
    ...), median per figure. One pair of runs is not enough: a bare run's peak alone varies by ~30 MB here."""
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in ["bare", *configs]}
    for _ in range(repeats):
        for config in runs:
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", key, config, str(steps), "--device", device,
                 "--root", str(root)],
                capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory run {key}/{config} failed:\n{proc.stderr[-3000:]}")
            runs[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    for c, rs in runs.items():
        out[c]["train_range"] = (min(r["train"] for r in rs), max(r["train"] for r in rs))  # type: ignore[assignment]
    return out


# ------------------------------------------------------------------------------------------------ report
def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(results: list[dict[str, Any]], memory: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace,
           total_s: float) -> str:
    lines = [
        "# Overhead of `Introspect` against a bare run",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/overhead.py', *map(shlex.quote, sys.argv[1:])])}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs), torch {torch.__version__} with 1 thread, lightning {pl.__version__}, Python "
        f"{platform.python_version()}, device `{args.device}`; total {total_s:.0f} s.  ",
        f"Blocks of {results[0]['block']} steps alternate bare and on (an on block runs up to "
        f"{Controller.MAX_EXTEND} steps longer while its writer works; what is left is drained, timed, into the "
        "block); each on step is taken over the median bare step of the bare blocks around its block; ratio: "
        "pooled over the run (per kind of step: sampled, flushing, writer still busy, the rest: count x median); "
        "ms/step: the same pooling of raw times; IQR and min-max: the ratio in each quarter of the run; "
        "'in callback' / 'in hooks': share of the on steps' time spent in the forwarded callback calls / in "
        "forward hooks (sampled forward minus median forward).",
        "",
        "Steps per configuration (on steps, bare steps as many): "
        + ", ".join(f"{r['key']} {r['steps_per_config']}" for r in results) + ".",
        "",
        "| workload | configuration | ms/step | ratio | IQR | min-max | in callback | in hooks | target | met |",
        "|:--|:--|--:|--:|:--|:--|--:|--:|:--|:--|",
    ]
    for res in results:
        lines.append(f"| {res['name']} | bare | {res['off_ms']:.1f} | 1 | | | | | | |")
        for c, r in res["rows"].items():
            target = TARGETS.get((res["key"], c))
            met = "" if target is None else ("yes" if r["ratio"] <= target else "**no**")
            aa = res["rows"].get(AA)
            if c == "unsampled only, no ids":  # "indistinguishable from bare": within 1 %, or within bare vs. bare
                noise = max(1.01, aa["max"]) if aa is not None else 1.01
                target_s, met = f"<= {noise:.3f}", "yes" if r["ratio"] <= noise else "**no**"
            else:
                target_s = "" if target is None else f"<= {target:.2f}x"
            lines.append(
                f"| | {c} | {r['on_ms']:.1f} | {r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} | "
                f"{r['min']:.3f}-{r['max']:.3f} | {_pct(r['callback'])} | {_pct(r['hooks'])} | {target_s} | {met} |"
            )
    lines += ["", "'unsampled only' is met when its ratio is at most 1.01 or within the bare-vs-bare control's "
              "quarter spread (the machine's noise floor in this run).", ""]
    with_budget = [res for res in results if res.get("budget_runs")]
    if with_budget:
        repeats = len(with_budget[0]["budget_runs"])
        lines += ["", f"Budget mode: {repeats} separate run(s) per workload, each with more steps (blocks as above, "
                  "each budget against its own interleaved bare blocks, with its own bare-vs-bare control); "
                  "achieved = the pooled ratio - 1 over the steps after the first third of the configuration's "
                  "run, i.e. after warm-up; the figure is the median over the runs, each run's is listed; the "
                  "target is within 1 percentage point of the budget:", "",
                  "| workload | steps | budget | achieved (median) | each run | interval chosen | "
                  "schedule's estimate | every-step floor | A/A control, each run | met |",
                  "|:--|--:|--:|--:|:--|:--|:--|:--|:--|:--|"]
        for res in with_budget:
            runs = res["budget_runs"]
            aa_s = ", ".join(_pct(b["rows"][AA]["ratio"] - 1) for b in runs if AA in b["rows"])
            for c in BUDGETS:
                rows = [b["rows"][c] for b in runs if c in b["rows"]]
                if not rows:
                    continue
                achieved = [r["aggregate"] - 1 for r in rows]
                mid = statistics.median(achieved)
                budget = rows[0]["budget"]
                met = "yes" if abs(mid - budget) <= 0.01 else "**no**"
                est = ", ".join("-" if r["estimate"] is None else _pct(r["estimate"]) for r in rows)
                floor = ", ".join(_pct(r["floor"]) for r in rows)
                lines.append(
                    f"| {res['name']} | {rows[0]['n']} | {_pct(budget)} | {_pct(mid)} | "
                    f"{', '.join(_pct(x) for x in achieved)} | {', '.join(str(r['interval']) for r in rows)} | "
                    f"{est} | {floor} | {aa_s} | {met} |"
                )
        lines += ["", "'every-step floor': the schedule's measure of the work no interval avoids (per-example "
                  "dynamics, the hook bodies; from b67b602 also the plain steps slowed by the writer's per-example "
                  "passes, from 46c747c the own time's untimed cost: the own time counted twice); when it "
                  "exceeds nine tenths of the budget the budget cannot be held, a warning says so, and the "
                  "sampled steps keep a tenth of the budget."]
    from lightning_introspect.core.introspector import EXTRAS_DUTY

    lines += ["", "Epoch end (per-example folding, `samples.npz`, and the data map when it is redrawn: at most "
              f"{_pct(EXTRAS_DUTY)} of the wall time; drained, so background work is included: a redraw on the writer thread "
              "stalls training about as long as it takes, since matplotlib holds the GIL), the mean over "
              "the epoch ends of the defaults and the longest:", ""]
    for res in results:
        ends = res["epoch_ends_ms"]
        if ends:
            mean, epoch_ms = statistics.mean(ends), res["off_ms"] * res["steps_per_epoch"]
            lines.append(f"- {res['name']}: {mean:.0f} ms per epoch end = {_pct(mean / epoch_ms)} of a "
                         f"{res['steps_per_epoch']}-step epoch (longest {max(ends):.0f} ms, {len(ends)} epoch ends)")
    if memory:
        lines += ["", f"Peak memory: rise of peak RSS (VmHWM) from after the data set and the model are made "
                  f"and freed heap pages are handed back (`malloc_trim`, in bare and defaults alike) to the end of "
                  f"training, one epoch (the tool's import and set-up included); median of "
                  f"{MEMORY_REPEATS} fresh processes each, interleaved, and their range; target <= "
                  f"{MEMORY_TARGET_MB:.0f} MB over bare at defaults; the last column is the same at the end of "
                  "`fit`, after teardown wrote the report files:", "",
                  "| workload | configuration | RSS at start MB | peak rise MB (range) | over bare MB | met "
                  "| after fit, over bare MB |",
                  "|:--|:--|--:|:--|--:|:--|--:|"]
        for key, per in memory.items():
            bare = per["bare"]
            for config, m in per.items():
                delta = m["train"] - bare["train"]
                met = "" if config != "defaults" else ("yes" if delta <= MEMORY_TARGET_MB else "**no**")
                after = m["after_fit"] - bare["after_fit"]
                d1, d2 = ("", "") if config == "bare" else (f"{delta:+.1f}", f"{after:+.1f}")
                lo, hi = m["train_range"]
                lines.append(f"| {WORKLOADS[key].name} | {config} | {m['base']:.0f} | {m['train']:.1f} "
                             f"({lo:.1f}-{hi:.1f}) | {d1} | {met} | {d2} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and workloads' steps (< 2 minutes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--configs", nargs="*", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=None, help="on steps per configuration (default per workload)")
    parser.add_argument("--budget-steps", type=int, default=None, help="on steps per budget configuration")
    parser.add_argument("--budget-repeats", type=int, default=None,
                        help=f"separate budget runs per workload (default {BUDGET_REPEATS}, 1 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    parser.add_argument("--memory-child", nargs=3, metavar=("WORKLOAD", "CONFIG", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    if args.memory_child:
        key, config, steps = args.memory_child
        memory_child(key, config, int(steps), args.device, args.root)
        return
    torch.set_num_threads(1)
    if args.quick and args.configs == CONFIGS:
        args.configs = QUICK_CONFIGS
    t_start = time.perf_counter()
    results, memory = [], {}
    with tempfile.TemporaryDirectory(prefix="introspect-overhead-") as tmp:
        root = Path(tmp)
        for key in args.workloads:
            n = args.steps or (STEPS[key] // 4 if args.quick else STEPS[key])
            main_configs = [c for c in args.configs if c not in BUDGETS]
            budgets = [c for c in args.configs if c in BUDGETS]
            budget_runs = []
            if budgets:  # the budget needs many sampled steps after warm-up to be measured to 1 point
                nb = args.budget_steps or (n if args.quick else BUDGET_STEPS[key])
                repeats = args.budget_repeats or (1 if args.quick else BUDGET_REPEATS)
                budget_runs = [time_workload(key, [AA, *budgets], nb, STEP_BLOCK, args.device, root)
                               for _ in range(repeats)]
            if main_configs:
                res = time_workload(key, main_configs, n, STEP_BLOCK, args.device, root)
            else:
                res = {**budget_runs[0], "rows": {}, "epoch_ends_ms": []}
            res["steps_per_config"] = n
            res["budget_runs"] = budget_runs
            print(f"[{key}] {res['wall_s']:.0f} s, bare {res['off_ms']:.1f} ms/step", file=sys.stderr, flush=True)
            results.append(res)
        if not args.no_memory:
            for key in args.workloads[:1] if args.quick else args.workloads:
                memory[key] = measure_memory(key, ["defaults"], 4 * BLOCK + 10, args.device, root)
    report = render(results, memory, args, time.perf_counter() - t_start)
    print(report)
    if args.out is not None:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
