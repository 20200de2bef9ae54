"""The Lightning callback: maps Trainer hooks onto the torch-only :class:`~lightning_introspect.core.Introspector`."""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Type, Union

from torch import Tensor, nn
from typing_extensions import override

from ._compat import CALLBACK_BASES, is_tensorboard_logger
from .core.config import DEFAULT_LAYER_TYPES, IntrospectConfig
from .core.batch import BatchKey, as_mapping, logits_of, read_ids_and_targets
from .core.introspector import Introspector
from ._trainer import (
    _check_arguments, _check_strategy, _check_writable, _clips_gradients, _dir_taken_error, _forward_to,
    _not_set_up, _runs_own_forward, _sample_ids_plan,
)
from .publish import write_report_files
from .sinks.tensorboard import TensorBoardSink

class Introspect(*CALLBACK_BASES):  # type: ignore[misc]
    """Live introspection of training: activations, dead units, gradient norms, per-example loss dynamics.

    Add it to a ``Trainer`` and open TensorBoard. Layer statistics are computed on *sampled* steps only
    (steps ``0 .. warmup_steps-1``, then every ``every_n_steps`` optimizer steps, or as often as
    ``overhead_budget`` allows); on other steps no hook is attached. Per-example dynamics run on every step
    from the logits the step already computed, when the training set is wrapped in :class:`WithIndex`.
    After ``fit``, :meth:`mislabeled` ranks the examples most likely to be mislabeled.

    Logged tags (``{statistic}/{layer}``; one multi-line chart per statistic in the Custom Scalars tab):

    ================================  ==========  ======================================================
    tag                               when        meaning
    ================================  ==========  ======================================================
    ``activation_mean/{layer}``       sampled     mean of the layer's output (first ``max_rows`` rows)
    ``activation_std/{layer}``        sampled     standard deviation of the output
    ``activation_min/{layer}``        sampled     smallest output value
    ``activation_max/{layer}``        sampled     largest output value
    ``activation_zero_fraction/{l}``  sampled     share of outputs with ``|x| <= zero_threshold``
    ``activation_nonfinite/{layer}``  sampled     count of NaN/Inf outputs
    ``activation_hist/{layer}``       sampled     histogram (bucket counts computed on the device)
    ``dead_fraction/{layer}``         sampled     share of units that passed no gradient in the last
                                                  ``dead_window`` sampled steps where judged: ReLU-like
                                                  modules by their output, other layers by the gradient
                                                  reaching them (see ``dead_threshold``)
    ``dead_count/{layer}``            sampled     number of such units
    ``dead_windows/{layer}``          sampled     how many windows the longest-dead unit has stayed dead
    ``saturated_fraction/{layer}``    sampled     Tanh, Sigmoid, Softsign, Hardtanh, Hardsigmoid: share of
                                                  units whose every output in the last ``dead_window``
                                                  sampled steps was saturated (derivative < 1 % of its peak)
    ``saturated_count/{layer}``,      sampled     number of such units; how many windows the longest-
    ``saturated_windows/{layer}``                 saturated unit has stayed saturated
    ``grad_norm/global``              sampled     L2 norm of all gradients (after AMP unscaling, before
                                                  gradient clipping; under manual optimization as
                                                  ``opt.step()`` runs: after any clipping done before it)
    ``grad_norm/global_clipped``      sampled     the same after clipping: the norm the optimizer step
                                                  used (only when ``gradient_clip_val`` is set or the
                                                  module overrides ``configure_gradient_clipping``; not on
                                                  a step the AMP grad scaler skips)
    ``grad_norm/{layer}``             sampled     L2 norm of the layer's parameter gradients
    ``grad_to_weight/{layer}``        sampled     gradient norm / weight norm
    ``update_to_weight/{layer}``      sampled     norm of the real optimizer update / weight norm
                                                  (also ``update_to_weight/global``)
    ``param_grad_norm/{param}``       sampled     per-parameter gradient norm (``param_grad_norms=True``)
    ``introspect/interval``           sampled     current sampling interval (steps)
    ``introspect/overhead``           sampled     measured slowdown estimate (after warm-up)
    ``samples/loss``                  epoch end   histogram of per-example mean loss this epoch
    ``samples/margin``                epoch end   histogram of per-example margin
    ``samples/confidence``            epoch end   histogram of given-label probability
    ``samples/learned_fraction``      epoch end   share of the examples seen so far that were classified
                                                  correctly in the latest epoch that saw them
    ``samples/forgotten_fraction``    epoch end   share of them forgotten this epoch (correct when last
                                                  seen before, now wrong)
    ``samples/flagged_fraction``      epoch end   share currently flagged as likely mislabeled (0 while
                                                  the cut abstains)
    ``samples/data_map``              epoch end   image: confidence vs. variability, coloured by correctness
    ``samples/suspects``              epoch end   text: table of the current top suspects, with the label
                                                  each one's dynamics suggest and its region; the flagged
                                                  share and noise estimate, or why the cut abstains
    ``samples/confusion``             epoch end   text: flagged examples by class: the most confused
                                                  (given, suggested) pairs, flagged share per class
    ``alerts/nonfinite``              on event    text: NaN/Inf loss, first layer in forward order
    ``alerts/bad_input``              on event    text: ids out of range/repeated, bad targets, non-finite
                                                  logits (see ``README``: what was done with the rows)
    ================================  ==========  ======================================================

    Cost: hooks only on sampled steps, 3-4 kernels per layer call (5-6 for a saturating activation, and one
    or two in the backward pass for a layer judged by its gradient) on a strided subsample of at most 4,096
    values; the captures of all layers are folded together on a background thread while the next backward
    pass runs (on the training thread under DDP, for its all-reduce); every device-to-host copy happens at a
    flush (once per sampled step, one batched copy, asynchronous on CUDA) or at an epoch end; writing runs on
    the background thread, during backward passes. Per-example dynamics keep each step's inputs and compute
    up to 16 steps' figures in one batched pass. Records go to ``<log_dir>/introspect/``.
    Under ``torch.compile`` a sampled step runs eagerly (``torch.compiler.set_stance("force_eager")``, the
    previous stance restored after it), so its hooks see every layer whatever shapes were compiled before.

    Args:
        every_n_steps: sample every N optimizer steps (after the warm-up).
        warmup_steps: sample each of the first K steps.
        overhead_budget: fraction, e.g. 0.02: adapt the interval so that the measured slowdown of the training
            step (data loading aside) stays near it, sampling at most every 2.5 steps (the interval can be
            fractional: 3.5 samples every third or fourth step). The work done on every step (per-example
            dynamics, the hook bodies) counts against the budget; when it alone exceeds the budget, a warning
            says so. How it is measured: :class:`~lightning_introspect.core.schedule.SamplingSchedule`.
        layers: fnmatch patterns of module names to watch (``["encoder.*", "head"]``); None = all modules of
            ``layer_types``.
        layer_types: module types watched (default: Linear, Conv*, MultiheadAttention and activation modules).
            Selected layers that no sampled step of the first epoch called are named in one warning.
        max_rows: rows of each layer output used per call (the batch is cut, not sampled).
        activations, histograms, dead_units, grad_norms, param_grad_norms, update_ratios: per-statistic switches.
        histogram_every_n_samples: histograms on every k-th sampled step only.
        dead_threshold: the edge of the ReLU rule: a ReLU, ReLU6 or LeakyReLU(0) unit fires when its output
            exceeds this (default 0; ReLU6 also stays below 6, a unit pinned at 6 passes no gradient either).
            Each activation has its own rule (:mod:`lightning_introspect.core.units`): Threshold and Hardswish
            are dead on their flat region; Tanh, Sigmoid, Softsign, Hardtanh and Hardsigmoid are logged as
            ``saturated_*`` instead; LeakyReLU, PReLU, RReLU, ELU, CELU, SELU, GELU, SiLU, Mish and Softplus pass
            gradient everywhere and are not judged. A Linear/Conv (any other layer) that no watched
            activation module follows, e.g. ``F.relu(self.fc(x))``, is judged by the gradient reaching its
            output: a unit is dead when that gradient was exactly 0 for every input (behind ``F.relu``, its
            pre-activation never exceeded 0; behind ``F.gelu`` or ``torch.tanh``, never a false dead unit).
        dead_window: a unit is dead (saturated) when it did not fire in the last ``dead_window`` sampled steps
            in which its layer was judged.
        zero_threshold: ``|x| <= zero_threshold`` counts as zero.
        sample_dynamics: per-example dynamics: None = on when sample ids are found (``WithIndex``), True =
            required (error if ids are missing), False = off.
        ids: where sample ids are in the batch: "auto" (``WithIndex``: last tuple element / "index" key), a
            tuple position, a dict key, or a function ``batch -> Tensor``.
        targets: where class targets are: "auto" (tuple position 1 / "label", "target", "y", ... keys), a
            position, key or function; a ``"targets"`` entry in the step output wins.
        num_examples: number of sample ids (they lie in ``[0, num_examples)``), when it cannot be found: by
            default the length of the ``WithIndex`` in the training set (the whole set when a ``Subset`` or
            ``random_split`` of it is trained on), else ``len(dataset)``.
        ignore_index: target value left out of the per-example figures, without a warning: an (N, C) row with
            it, a token of (N, T, C) logits with it.
        history: also write each epoch's per-example figures to ``introspect/history/`` (disk, not RAM).
        class_names: names of the classes, for tables and reports.
        describe: ``describe(sample_id) -> str``, e.g. the text of an example: the ``text`` column of
            ``suspects.csv`` and of the ``samples/suspects`` TensorBoard table (called for every ranked example
            when the table is built, for the shown rows at each epoch end).
        log_dir: where to write when the Trainer has no TensorBoardLogger (default: the Trainer's log dir).
        forward_to_loggers: also send scalars to the Trainer's other loggers (CSV, W&B, ...).
        name: tells several ``Introspect`` callbacks on one Trainer apart (letters, digits, ``_``, ``-``,
            ``.``). A named callback writes to ``<log_dir>/<name>/`` (its own TensorBoard run with the same tags,
            and ``<log_dir>/<name>/introspect/``), prefixes the scalars it forwards to other loggers with
            ``<name>/`` and keeps its checkpoint state under its own key. Unnamed, it writes to ``<log_dir>``;
            a second unnamed one on the same Trainer is refused by Lightning (state keys must be unique).

    Logits: taken from the step output's ``"logits"`` entry, else from the output of the LightningModule's own
    ``forward`` (under any strategy: a call that a strategy routes through the module, e.g. DDP running
    ``training_step`` inside ``forward``, is not taken for it). A ``training_step`` that returns ``None``
    (Lightning's way to skip a batch) is skipped here too, at any step: the batch adds nothing to the
    per-example dynamics.

    Reuse: each ``fit`` with a new Trainer starts fresh (new records, new TensorBoard points in that Trainer's
    log dir, hooks on the model being fit); it must not resolve to the log dir of this callback's previous
    run, unless it resumes that run from a checkpoint (``fit(..., ckpt_path=...)``). A second ``fit`` on the
    same Trainer and model continues the records, as a resume does. Fitting a different model on the same
    Trainer is refused (use a new Trainer).
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        warmup_steps: int = 5,
        overhead_budget: Optional[float] = None,
        layers: Optional[Sequence[str]] = None,
        layer_types: Tuple[Type[nn.Module], ...] = DEFAULT_LAYER_TYPES,
        max_rows: int = 64,
        activations: bool = True,
        histograms: bool = True,
        histogram_every_n_samples: int = 1,
        dead_units: bool = True,
        dead_threshold: float = 0.0,
        dead_window: int = 4,
        zero_threshold: float = 0.0,
        grad_norms: bool = True,
        param_grad_norms: bool = False,
        update_ratios: bool = True,
        sample_dynamics: Optional[bool] = None,
        ids: BatchKey = "auto",
        targets: BatchKey = "auto",
        num_examples: Optional[int] = None,
        ignore_index: int = -100,
        history: bool = False,
        class_names: Optional[Sequence[str]] = None,
        log_dir: Optional[Union[str, os.PathLike]] = None,
        forward_to_loggers: bool = True,
        name: Optional[str] = None,
        describe: Optional[Callable[[int], str]] = None,
    ) -> None:
        super().__init__()
        _check_arguments(name=name, ids=ids, targets=targets, describe=describe)
        self.name = name
        self.config = IntrospectConfig(
            every_n_steps=every_n_steps, warmup_steps=warmup_steps, overhead_budget=overhead_budget,
            layers=layers if layers is None or isinstance(layers, str) else list(layers),  # a str fails in the config
            layer_types=tuple(layer_types) if isinstance(layer_types, (list, tuple)) else layer_types, max_rows=max_rows,
            activations=activations, histograms=histograms, histogram_every_n_samples=histogram_every_n_samples,
            dead_units=dead_units, dead_threshold=dead_threshold, dead_window=dead_window,
            zero_threshold=zero_threshold, grad_norms=grad_norms, param_grad_norms=param_grad_norms,
            update_ratios=update_ratios, sample_dynamics=sample_dynamics, num_examples=num_examples,
            ignore_index=ignore_index, history=history,
        )
        self.ids_key = ids
        self.targets_key = targets
        self.class_names = list(class_names) if class_names is not None else None
        self.describe = describe
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.forward_to_loggers = forward_to_loggers
        self.core: Optional[Introspector] = None
        self.records_dir: Optional[Path] = None
        self.threshold_ids: Any = None
        self._dynamics = False
        self._id_key: BatchKey = None
        self._index_key: Optional[str] = None  # the WithIndex's key, when the training set is wrapped in one
        self._captured: Any = None
        self._capture_handle: Any = None
        self._capturing = False
        self._frames: list[bool] = []  # per open call of the module's __call__: whether it runs the user's forward
        self._redirected = False  # the strategy wraps the module and calls training_step through it
        self._logits_in_output: Optional[bool] = None
        self._loaded_state: Optional[dict[str, Any]] = None
        self._trainer: Any = None
        self._clipping = False  # whether Lightning clips gradients after on_before_optimizer_step
        self._dir_taken = False  # this fit would start over in the previous run's records dir (see setup)

    @property
    @override
    def state_key(self) -> str:
        # Unnamed: the key checkpoints have always used, so that they still load.
        return "Introspect" if self.name is None else self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer)
        carried = self._end_previous_run(trainer, pl_module)
        self._trainer = trainer
        tb = next((lg for lg in trainer.loggers if is_tensorboard_logger(lg)), None)
        if tb is not None:
            log_dir = Path(tb.log_dir)
        else:
            log_dir = self.log_dir or Path(trainer.log_dir or trainer.default_root_dir)
        if self.name is not None:
            log_dir = log_dir / self.name
        records_dir = log_dir / "introspect"
        # A new Trainer in the previous run's dir is refused at on_train_start, unless a checkpoint is loaded in
        # between (`fit(ckpt_path=...)` restores the callbacks after setup): that resumes the run in its own dir.
        same_dir = self.records_dir is not None and records_dir.resolve() == self.records_dir.resolve()
        self._dir_taken = carried is None and same_dir and self._loaded_state is None
        self.records_dir = records_dir
        sinks: list[Any] = []
        if trainer.is_global_zero:
            _check_writable(self.records_dir)
            own_writer = tb is None or self.name is not None
            sinks.append(TensorBoardSink(log_dir if own_writer else tb.experiment))  # type: ignore[union-attr]
        others = [lg for lg in trainer.loggers if not is_tensorboard_logger(lg)] if self.forward_to_loggers else []
        on_scalars = _forward_to(others, self.name) if others and trainer.is_global_zero else None
        self.core = Introspector(
            pl_module, self.config, sinks=sinks, records_dir=self.records_dir, on_scalars=on_scalars,
            class_names=self.class_names, is_writer=trainer.is_global_zero,
        )
        self.core.describe = self.describe
        if carried is not None:
            self.core.load_state_dict(carried)
        if self._loaded_state is not None:
            self.core.load_state_dict(self._loaded_state)
            self._loaded_state = None

    def _end_previous_run(self, trainer: Any, pl_module: Any) -> Optional[dict[str, Any]]:
        """Closes the previous fit's core (its writer thread and sinks) and returns its state when this fit
        continues it: the same Trainer fitting the same model again, which continues like a resume. A new
        Trainer starts fresh; the same Trainer with another model is refused, as neither continuing nor
        starting over in the first run's log dir is well defined."""
        prev = self.core
        if prev is None:
            return None
        if trainer is self._trainer and pl_module is not prev.model:
            raise RuntimeError(
                f"Introspect recorded a fit of another {type(prev.model).__name__} on this Trainer: fitting "
                f"a different model ({type(pl_module).__name__}) on the same Trainer would mix both models' "
                "records and TensorBoard points in one log dir. Use a new Trainer for the new model."
            )
        prev.close()  # idempotent: nothing of the previous run writes after this point
        self.core = None
        self._remove_capture_hook()
        self._dynamics, self._id_key, self._logits_in_output = False, None, None
        self.threshold_ids = None
        return prev.state_dict() if trainer is self._trainer else None

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        core = self._require_core()
        if self._dir_taken:
            raise _dir_taken_error(self.records_dir)
        self._clipping = _clips_gradients(trainer, pl_module)
        plan = _sample_ids_plan(trainer.train_dataloader, self.config, self.ids_key)
        if plan.threshold_ids is not None:
            self.threshold_ids = core.threshold_ids = plan.threshold_ids
        self._dynamics, self._id_key, self._index_key = plan.dynamics, plan.id_key, plan.index_key
        if plan.num_examples is not None:
            core.num_examples = plan.num_examples  # a store made for fewer examples grows (its records are kept)

    # ------------------------------------------------------------------------------------------------ steps
    # These hooks run on every step. The core's begin_step and end_step time themselves (the budget's
    # every-step cost); hook bodies that do more than a few attribute reads run inside `core.own_time()`.
    # Each Python call costs about a microsecond here (the forward and backward passes have just emptied the
    # caches), so an unsampled step without per-example dynamics makes two core calls and reads a few flags.
    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        core = self.core
        if core is None:
            raise _not_set_up()
        core.begin_step(trainer.global_step)
        if self._dynamics and self._logits_in_output is not True:
            self._captured = None
            if self._capture_handle is None:  # registered once (teardown removes them): cheaper per step
                self._capture_handle = [pl_module.register_forward_hook(self._capture)]
                # Under a strategy that wraps the module (DDP, FSDP, DeepSpeed), Lightning runs `training_step`
                # through the module's own __call__ with `forward` swapped for it (`_ForwardRedirection`): that
                # call's output is the step's output, and the user's `self(x)` is a call nested inside it.
                wrapper = getattr(trainer.strategy, "model", None)
                self._redirected = wrapper is not None and wrapper is not pl_module
                if self._redirected:
                    self._capture_handle.append(pl_module.register_forward_pre_hook(self._enter_call))
            self._frames.clear()  # a forward that raised last step left its call open
            self._capturing = True

    def _enter_call(self, module: nn.Module, args: Any) -> None:
        # Notes, per open call of the module, whether it runs the user's forward: only such a call is captured.
        if self._capturing:
            self._frames.append(_runs_own_forward(module))

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        # Runs inside the user's forward: as little as possible, timed as the tool's own (the budget's every-step
        # cost). Only a detached tensor is kept: holding the output itself would hold its autograd graph, and
        # the tool would then pay for freeing it (0.2 ms on the benchmark's Transformer), which the training
        # loop does anyway.
        if not self._capturing:  # a validation or predict forward
            return
        if self._redirected and not (self._frames and self._frames.pop()):  # a strategy's call of training_step
            return
        t0 = time.perf_counter()  # never inside another timed call: counted directly (no context object)
        self._captured = output.detach() if isinstance(output, Tensor) else logits_of(output)
        self.core.add_own_time(time.perf_counter() - t0)  # type: ignore[union-attr]  # set before capturing

    # The backward window (see AsyncWriter.window) only matters while the writer has work: the writer checks
    # that itself, one call from here. Left untimed: a few attribute reads.
    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        core = self.core
        if core is not None:
            core.before_backward()

    @override
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        core = self.core
        if core is not None:
            core.after_backward()

    # Lightning calls this hook before it clips the gradients: grad_norm/global is the norm before clipping.
    # With clipping on, the core also reads the norm the optimizer step uses (grad_norm/global_clipped): as the
    # step starts under AMP (scaler.step follows the clipping), else as it ends (the step began before this
    # hook: Lightning runs the closure inside optimizer.step), from the gradients the step left.
    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        core = self.core
        if core is not None and core.sampled:  # observe_gradients is timed
            core.observe_gradients(optimizer, clipping=self._clipping)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        core = self.core
        if core is None:
            raise _not_set_up()
        loss = outputs if isinstance(outputs, Tensor) else as_mapping(outputs).get("loss")
        if loss is None and not outputs and pl_module.automatic_optimization:
            # training_step returned None: Lightning skipped the batch (no backward, no update); so does this.
            self._capturing = False
            self._captured = None
            core.end_step(None)
            return
        if not self._dynamics:
            core.end_step(loss)
            return
        with core.own_time():
            self._capturing = False
            try:
                self._observe_batch(core, outputs, batch)
            finally:
                self._captured = None
                core.end_step(loss)

    def _observe_batch(self, core: Introspector, outputs: Any, batch: Any) -> None:
        out = as_mapping(outputs)
        logits = out.get("logits")
        if self._logits_in_output is None:
            self._logits_in_output = isinstance(logits, Tensor)
            if self._logits_in_output:  # training_step returns them: the forward hook is not needed
                self._remove_capture_hook()
        captured = False
        if logits is None:
            logits = self._captured if isinstance(self._captured, Tensor) else None
            captured = logits is not None
        sample_loss = out.get("sample_loss")
        try:
            ids, targets = read_ids_and_targets(
                batch, out, logits, captured=captured, forward_output=self._captured, ids_key=self._id_key,
                targets_key=self.targets_key, index_key=self._index_key, user_ids_key=self.ids_key,
                first_batch=core.batches_seen == 0,
            )
        except ValueError as err:
            core.skip_batch(err)  # raised while no batch was accepted, else a warning
            return
        core.observe_batch(ids, targets=targets, logits=logits, sample_loss=sample_loss)

    @override
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.core is not None:
            self.core.pause()

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._require_core().end_epoch(trainer.current_epoch, trainer.global_step)

    @override
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.core is not None:
            self.core.flush()

    def _remove_capture_hook(self) -> None:
        if self._capture_handle is not None:
            for handle in self._capture_handle:
                handle.remove()
            self._capture_handle = None
        self._capturing = False
        self._captured = None
        self._frames.clear()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._remove_capture_hook()
        if stage != "fit" or self.core is None:
            return
        core = self.core
        core.close()
        # After a failed write the user was warned once already (log dir unwritable or full): no second warning.
        if trainer.is_global_zero and core.has_epoch_records and core.task != "regression" and not core.write_failures:
            assert self.records_dir is not None
            # Not self.mislabeled(): an abstaining cut warns the user who asks, not every fit's end.
            write_report_files(self.records_dir, lambda: core.mislabeled(threshold_ids=self.threshold_ids),
                               core.records, core.task, self.class_names)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove_capture_hook()
        if self.core is not None:
            self.core.close()

    # ------------------------------------------------------------------------------------------------ results
    def mislabeled(self, *, method: str = "default", cut: Any = "auto") -> Any:
        """Examples ranked most likely mislabeled first, with scores and the automatic cut.

        Returns a :class:`~lightning_introspect.core.scoring.Suspects` (``suggested_labels``, ``pred_probs``,
        ``class_view()``, ``to_pandas()``); the same table is written to ``<log_dir>/introspect/suspects.csv``
        and the per-class view to ``confusion.md`` after ``fit``. When the run gives too little evidence for the
        automatic cut it flags nothing and warns why (``Suspects.abstained``).
        """
        suspects = self._require_core().mislabeled(method=method, cut=cut, threshold_ids=self.threshold_ids)
        if suspects.abstained is not None:
            warnings.warn(f"lightning_introspect: the automatic cut flags no example: {suspects.abstained}",
                          UserWarning, stacklevel=2)
        return suspects

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict() if self.core is not None else (self._loaded_state or {})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.core is not None:
            self.core.load_state_dict(state_dict)
            self._dir_taken = False  # a checkpoint restored after setup: this fit resumes that run
        else:
            self._loaded_state = dict(state_dict)

    def _require_core(self) -> Introspector:
        if self.core is None:
            raise _not_set_up()
        return self.core
