"""Cross-Iteration Batch Normalization (Yao et al., "Cross-Iteration Batch Normalization", CVPR 2021)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.profiler import record_function
from torch.utils.hooks import RemovableHandle

from cbn import clock, history
from cbn.functional import CrossIterationNorm, constant, operand, stats_dtype, to_dtype
from cbn.statgrad import GRAD_PATHS, ConvGeometry, GradPath

PROFILER_LABELS = ("cbn::compensate_window", "cbn::normalize", "cbn::record_history", "cbn::statistic_gradients",
                   "cbn::running_stats")


def profiled(label: str):
    """A torch.profiler range named label while a profiler records (so reports can group CBN's own
    work, PROFILER_LABELS), and nothing at all otherwise: no dispatcher call in ordinary training.
    Nothing under torch.compile either, which drops such ranges: reading the profiler's state there
    would make a compiled step recompile whenever a profiler starts or stops."""
    if torch.compiler.is_compiling() or not torch.autograd.profiler._is_profiler_enabled:
        return nullcontext()
    return record_function(label)


class CrossIterationBatchNorm2d(nn.Module):
    r"""BatchNorm2d whose statistics also use the k-1 previous training iterations.

    At training iteration t the layer computes the batch mean mu_t and variance of its input, as BN
    does, and averages them with the statistics it recorded at iterations t-1 .. t-k+1. Those past
    statistics were computed under older weights, so each is first compensated to the current weights
    of the conv that produces this layer's input, with a first-order Taylor term (paper Eq. 7-8):

        mu_{t-tau}(theta_t) = mu_{t-tau} + dmu/dtheta . (theta_t - theta_{t-tau})      (same for nu = E[x^2])

    then averaged (Eq. 9-11) and used to normalize (Eq. 12)::

        mu_bar  = mean_tau mu_{t-tau}(theta_t)
        var_bar = mean_tau max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2) - mu_bar^2
        y       = gamma * (x - mu_bar) / sqrt(var_bar + eps) + beta

    The layer keeps each iteration's variance rather than nu and evaluates var_bar in the equivalent
    form mean_tau max(var_tau, 0) + mean_tau (mu_tau - mu_bar)^2, which avoids the cancellation of
    E[x^2] - E[x]^2; all statistics are float32 (float64 for float64 inputs) whatever the input dtype.

    How it differs from BatchNorm2d:

    * Gradients flow through the current batch's statistics only: past statistics, their
      compensation (which uses theta_t detached) and everything kept for later are constants.
    * ``window=1`` is exactly BatchNorm2d; the first ``burn_in`` iterations use window 1 and record
      nothing, after which the window fills one iteration at a time (nothing zero-filled is averaged).
    * ``compensate=False`` averages raw past statistics: the paper's "Naive CBN" baseline.
    * ``grad_path`` picks how dmu/dtheta and dnu/dtheta are obtained: "efficient" (Appendix B, one
      extra weight-gradient convolution per step, |W| + C_in*K floats per past step) or "naive"
      (dense Jacobians from torch.func.jacrev, O(C^2*C_in*K)). Both give the same statistics.
    * Running statistics are updated, as BN updates them on every training forward, from the
      statistics actually used to normalize (the compensated window), with the unbiased factor of
      the window's example count. They are what the network was trained against, and the window's
      variance includes the spread of the means between iterations that a single small batch misses.
      Evaluation mode is then exactly BatchNorm2d's computation and cost.

    What an iteration is: the window advances once per update of the parameters the layer depends
    on (the bound conv's weight and bias, its own gamma and beta): a step of any torch optimizer that
    holds one of them, or, in eager mode, an in-place update by hand (their version counters
    change); ``cbn.advance(model)`` says so where neither applies (cbn/clock.py). An optimizer step
    that GradScaler skips is no iteration. Within an iteration, only the first grad-enabled training
    call records its statistics (calls under ``torch.no_grad()`` never do), and every call uses the
    window computed at the first: gradient checkpointing's recompute, a module called twice in one
    step, or a profiling pass between optimizer steps see the same window and never push extra
    history. A conv that is never updated therefore never advances the window. Save checkpoints
    between iterations.

    When the compensation fails: nu = E[x^2] is a convex quadratic in the conv's weights (for input
    patches with second-moment matrix Sigma, nu_c(W) = W_c^T Sigma W_c), so its first-order Taylor
    term always underestimates it, by dW_c^T Sigma dW_c >= 0, and a compensated variance
    nu - mu^2 can come out negative, mostly while the weights still move fast.
    ``negative_variance`` says what becomes of such a (past iteration, channel) entry:

    * ``"clamp"`` (the default, Eq. 10): its variance counts as 0 (max(nu, mu^2)); its mean stays.
    * ``"drop"``: the entry leaves that channel's window, mean and mean square alike; window
      weights and example counts are then per channel, in the normalization, its backward and the
      running statistics.

    Either way the layer counts, on the device, the window entries it compensated
    (``compensated_entries``) and those whose variance came out negative (``negative_variances``),
    once per iteration; ``cbn.negative_variance_counts(model)`` reads them (one host sync per layer).
    Naive CBN never compensates, so its counts stay 0. A long burn-in is the paper's remedy.

    Non-finite batches, decided without asking the host: a training step never waits for the
    device (no host synchronization), so the layer cannot raise when a batch's statistics are inf or
    nan. Such a batch is normalized as BatchNorm2d would normalize it (its output is not finite
    either), its history entry is stored with weight 0, so it never enters a later window, running
    statistics keep their values in every channel whose window statistics are not finite, and the
    batch is counted on the device in ``nonfinite_batches``. The count is read at two well-defined
    points: ``model.eval()`` (``train(False)``) warns once per layer with new non-finite batches, and
    ``cbn.check_finite(model)`` raises FloatingPointError naming the layers; call it where you read
    the loss anyway. (A batch whose statistics sum overflows float32 also counts as non-finite.)

    One training step dispatches the same ops whatever the window: all past slots are compensated
    at once, in two batched contractions, and weighted by their validity on the device.

    Under DistributedDataParallel each process keeps its own window (statistics per device, as in
    the paper): ``per_rank_buffers()`` names what DDP must not broadcast from rank 0, and
    ``cbn.convert`` (or ``cbn.keep_statistics_per_rank``) puts it in DDP's ignore list. A checkpoint
    of rank 0's ``state_dict()`` holds rank 0's window only: ``cbn.gather_per_rank_state`` and
    ``cbn.load_per_rank_state`` save and give back every rank's (cbn/distributed.py).

    Under torch.compile a training step is one graph with no break (``fullgraph=True`` works):
    nothing in the forward asks the host which iteration it is. The iteration is a counter on the
    device that the clock advances outside the forward; which slot to write and which slots are in
    the window are computed from it and from the slots' stamps on the device (cbn/history.py). What
    the forward reads from Python are flags that change rarely: burn-in (ends once per run: one
    recompile), and whether this iteration's window is computed and its record made (each the same
    at every iteration's first call, so a training loop compiles once). The history is allocated
    when the layer is built and bound, never inside a step.

    The layer must be bound to the nn.Conv2d whose output it normalizes (``bind`` or ``cbn.convert``)
    before it trains with compensation. It checks at run time that its input is that conv's output.
    """

    # 2: history_valid (one flag per slot) added; a version-1 state gets it from its slot iterations.
    # 3: history_offset_mean and history_offset_sq dropped (they equal mu and 2 nu; see _compensate).
    # 4: the iteration and slot stamps are buffers (current_iteration, history_iteration), not extra state,
    #    and a stamp says whether its slot is valid (history_valid dropped); cbn/history.py upgrades.
    _version = 4

    # Parameters and buffers (register_parameter / register_buffer), declared for type checkers.
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    nonfinite_batches: Tensor
    compensated_entries: Tensor
    negative_variances: Tensor
    current_iteration: Tensor  # the current training iteration, on the device (cbn/clock.py advances it)
    # The history (cbn/history.py), window > 1 only; the path's fields (history_grad_mean, ...) are
    # reached by name and exist once the layer is bound.
    history_mean: Tensor
    history_var: Tensor
    history_iteration: Tensor
    # Per-step transients and host-side iteration state (_reset_transients, _set_iteration_flags)
    _captured: tuple[Tensor, Tensor] | None
    _window: tuple[Tensor, Tensor, Tensor] | None
    _versions_seen: tuple[int, ...] | None
    _host_iteration: int
    _burning_in: bool
    _ran: bool
    _fresh: bool
    _recorded: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        window: int = 4,
        burn_in: int = 0,
        grad_path: str = "efficient",
        compensate: bool = True,
        negative_variance: str = "clamp",
    ) -> None:
        super().__init__()
        _check_options(num_features, track_running_stats, window, burn_in, grad_path, negative_variance)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = True
        self.window = window
        self.burn_in = burn_in
        self.grad_path = grad_path
        self.compensate = compensate
        self.negative_variance = negative_variance
        self.name: str | None = None  # set by cbn.convert; used in error messages
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # Recorded batches whose statistics were not finite (kept out of every window); counted on
        # the device so that no training step waits for the host. See check_finite().
        self.register_buffer("nonfinite_batches", torch.tensor(0, dtype=torch.long, device=device), persistent=False)
        self._nonfinite_reported = 0
        self._compiled_training = False  # a training forward ran under torch.compile ...
        self._advanced_while_compiled = False  # ... and the clock advanced the layer since
        # Window entries (past iteration x channel) compensated, and those whose compensated
        # variance was negative (clamped or dropped by the rule), summed over iterations, on the device.
        for counter in ("compensated_entries", "negative_variances"):
            self.register_buffer(counter, torch.tensor(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("current_iteration", torch.tensor(0, dtype=torch.long, device=device))
        # History of past iterations, one slot per past step (window - 1 slots); the path's fields
        # are None (neither saved nor loaded) until bind gives them their shapes.
        for field in self._history_fields():
            self.register_buffer(field, None)
        self._conv: nn.Conv2d | None = None
        self._conv_name: str | None = None
        self._conv_hook: RemovableHandle | None = None
        self._allocate_history(stats_dtype(dtype or torch.get_default_dtype()), device)
        clock.register(self)
        self._reset_transients()

    # ------------------------------------------------------------------ binding
    def bind(self, conv: nn.Conv2d, name: str | None = None, conv_name: str | None = None) -> CrossIterationBatchNorm2d:
        """Use ``conv``'s weight (and bias) for the compensation; conv must feed this layer directly.

        Binding starts a fresh history, allocated here from the conv's geometry, in the statistics'
        dtype of the conv's weight on its device. ``name`` and ``conv_name`` only label error messages.
        """
        _check_bindable(conv, self.num_features, self._label())
        if self._conv_hook is not None:
            self._conv_hook.remove()
        # A plain attribute, not a submodule: the conv belongs to its own parent and must not appear
        # twice in state_dict or parameters(). deepcopy keeps the pairing through its memo.
        object.__setattr__(self, "_conv", conv)
        self._conv_hook = conv.register_forward_hook(self._capture_conv_io)
        if name is not None:
            self.name = name
        self._conv_name = conv_name
        self._allocate_history(stats_dtype(conv.weight.dtype), conv.weight.device)
        self._reset_transients()
        return self

    @property
    def conv(self) -> nn.Conv2d | None:
        return self._conv

    def _capture_conv_io(self, conv: nn.Conv2d, args: tuple, output: Tensor) -> None:
        # Keep references (no copies) to the conv's input and output for this step's statistic
        # gradients; the conv saves its input for backward anyway.
        if self.training and self.compensate and self.window > 1 and torch.is_grad_enabled():
            self._captured = (args[0], output)

    def clocked_parameters(self) -> list[Tensor]:
        """The parameters whose update starts a new iteration: gamma, beta, the conv's weight and bias."""
        tensors: list[Tensor | None] = [self.weight, self.bias]
        if self._conv is not None:
            tensors += [self._conv.weight, self._conv.bias]
        return [t for t in tensors if t is not None]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.compensate and self.window > 1:
            self._require_conv()  # fail on the first training step, not after burn-in
        if torch.compiler.is_compiling():
            self._compiled_training = True  # for the warning at eval() if nothing advances the clock
        else:
            self._follow_parameter_versions()
        self._ran = True
        captured, self._captured = self._captured, None
        if self.window == 1 or self._burning_in or x.numel() == 0:
            return self._batch_norm(x)
        # Only the first grad-enabled call of an iteration records (a checkpoint's recompute or a
        # second call must not push extra history); the flags are host state reset by the clock.
        record = torch.is_grad_enabled() and not self._recorded
        if record and self.compensate:
            self._check_captured(x, captured)
        # The statistics, the history and the compensation run with autocast off: the compensation
        # subtracts nearly equal dot products, which bfloat16/float16 would cancel away.
        with torch.autocast(x.device.type, enabled=False):
            self._check_history_dtype(x)
            if self._fresh:  # the window is computed once per iteration, before anything is recorded
                with profiled("cbn::compensate_window"):
                    self._window = self._past_window()
                self._fresh = False
            assert self._window is not None  # computed at the iteration's first call
            past_mean, past_var, past_weights = self._window
            with profiled("cbn::normalize"):
                out, mean, var, mean_bar, var_bar, count = CrossIterationNorm.apply(
                    x, self.weight, self.bias, past_mean, past_var, past_weights, self.eps)
            if record:
                with profiled("cbn::record_history"):
                    self._record(x, mean, var, captured)
                self._recorded = True
            with profiled("cbn::running_stats"):
                self._update_running_stats(mean_bar, var_bar, count)
        return out

    def _batch_norm(self, x: Tensor) -> Tensor:
        """Window 1: BatchNorm2d itself (same kernel, same running-statistics update)."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor | int) -> None:
        """BN's update from the window statistics; a channel whose statistics are not finite keeps
        its running statistics (decided on the device: no host sync)."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if isinstance(count, int):
            unbiased = var * (count / max(count - 1, 1))
        else:
            unbiased = var * count / torch.sub(count, constant(1, count.dtype)).clamp_min_(1)
        finite = _finite(mean + unbiased)  # inf - inf and nan + x are nan: one test for both
        for running, new in ((self.running_mean, mean), (self.running_var, unbiased)):
            running.lerp_(to_dtype(torch.where(finite, new, running), running.dtype), momentum)

    # ------------------------------------------------------------------ iterations
    def ran_this_iteration(self) -> bool:
        """Whether a training forward ran since the iteration began: an update before any forward
        (a second optimizer over the same layer, a manual change after the step) is no new iteration."""
        return self._ran

    def start_next_iteration(self) -> None:
        """The host side of a new iteration (cbn/clock.py advances ``current_iteration`` on the device)."""
        self._host_iteration += 1
        self._advanced_while_compiled = self._compiled_training
        self._set_iteration_flags()
        self._versions_seen = self._parameter_versions()

    def _set_iteration_flags(self) -> None:
        # Read by the forward; each flips at most once per iteration, and _burning_in once per run
        # (a compiled step recompiles for it once).
        self._burning_in = self._host_iteration < self.burn_in
        self._ran = False  # a training forward ran in this iteration
        self._fresh = True
        self._recorded = False

    def _parameter_versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self.clocked_parameters())

    def _follow_parameter_versions(self) -> None:
        """Eager only: parameters updated in place since the last iteration began, without an optimizer
        step (which advances the clock itself), start a new iteration."""
        versions = self._parameter_versions()
        if not versions:
            raise RuntimeError(
                f"{self._label()}: cannot tell training iterations apart: it has no affine parameters "
                "and no bound conv. Bind it to the conv that feeds it (layer.bind(conv) or cbn.convert(model))."
            )
        if versions != self._versions_seen:
            if self._versions_seen is not None:
                clock.advance_layers([self])  # a no-op unless a forward ran since the last advance
            self._versions_seen = versions

    # ------------------------------------------------------------------ the window and the history
    @torch.no_grad()
    def _past_window(self) -> tuple[Tensor, Tensor, Tensor]:
        """This iteration's compensated past (mean, var) for every slot and channel, (k-1, C) each,
        and their weights, (k-1, C): 1 for an entry in the window, 0 for a slot outside it (empty,
        older than t-k+1, a non-finite record) or (rule "drop") a negative compensated variance; a
        weight-0 entry's mean and var are 0. Computed for all slots at once, on the device."""
        mean, var = self.history_mean, self.history_var
        keep = history.in_window(self.current_iteration, self.history_iteration, self.window)  # (k-1, 1)
        if self.compensate:
            mean, var = self._compensate(mean, var)
            # Finite records can still compensate to inf or nan (a gradient field that overflowed,
            # a huge weight change): such a slot drops out of this window too.
            keep = torch.bitwise_and(keep, _finite((mean + var).sum(1, keepdim=True)))  # one dispatch, & two
            negative = torch.bitwise_and(torch.lt(var, constant(0.0, var.dtype)), keep)
            # count_nonzero: two dispatches, where a bool sum converts to long first (seven).
            self.compensated_entries.add_(keep.count_nonzero(), alpha=mean.shape[1])
            self.negative_variances.add_(negative.count_nonzero())
            if self.negative_variance == "drop":
                keep = keep & ~negative
            var = var.clamp_min(0.0)  # Eq. 10's max(nu, mu^2); a dropped entry's is zeroed below
        # (k-1, 1) weights, one per slot, broadcast over the channels; (k-1, C) with rule "drop".
        zero = operand(0.0, mean)
        weights = torch.where(keep, operand(1.0, mean), zero)  # two dispatches, a cast four
        return torch.where(keep, mean, zero), torch.where(keep, var, zero), weights

    def _compensate(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 7-8 for all slots: the recorded (mean, var) moved to the current conv weights.

        The Taylor term needs the linear forms L at the current weights and at the recording ones,
        and the latter are the recorded statistics themselves: mu and nu are homogeneous of degree
        1 and 2 in the conv's (weight, bias), so by Euler's theorem L_mu(theta_past) = mu_past and
        L_nu(theta_past) = 2 nu_past. Hence mu_now = L_mu(theta_t), exact since mu is linear, and
        nu_now = nu_past + L_nu(theta_t) - 2 nu_past = L_nu(theta_t) - nu_past."""
        weight, bias = self._current_conv_params(mean.dtype)
        mean_now, lin_sq = self._path.linear(self._path_fields(self._geometry()), weight, bias, mean)
        # nu_now = L_nu(theta_t) - nu_past, nu_past = var + mu^2, built in a fresh (S, C) tensor laid
        # out like the history (lin_sq is a transposed view: results shaped by it vary in layout with S).
        nu_now = torch.addcmul(var, mean, mean).neg_().add_(lin_sq)
        # var_now = nu_now - mu_now^2, not clamped yet: the negative-variance rule decides (_past_window).
        var_now = torch.addcmul(nu_now, mean_now, mean_now, value=-1.0)
        return mean_now, var_now

    def _current_conv_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The bound conv's weight and bias as constants in the statistics' dtype, the weight laid
        out as the history is, contiguous (callers run under no_grad, so no detach is needed; no
        copy when dtype and layout already match, and a channels_last weight is copied)."""
        conv = self._require_conv()
        bias = None if conv.bias is None else to_dtype(conv.bias, dtype)
        return to_dtype(conv.weight, dtype).contiguous(), bias

    @torch.no_grad()
    def _record(self, x: Tensor, mean: Tensor, var: Tensor, captured: tuple[Tensor, Tensor] | None) -> None:
        """Store this iteration's statistics (and what compensating them later needs) in its slot.

        The entry's validity is decided on the device: a non-finite entry is stamped EMPTY, so it
        never enters a window, and counted in ``nonfinite_batches``; no host sync."""
        # Eager, the host knows the iteration, and writes go through views of the slot; compiled,
        # the slot is computed on the device, so that the graph is the same at every iteration.
        slot: int | Tensor = (self.current_iteration.remainder(self.window - 1).view(1) if torch.compiler.is_compiling()
                              else self._host_iteration % (self.window - 1))
        if self.compensate:
            with profiled("cbn::statistic_gradients"):
                self._statistic_gradients(x, mean, captured, slot)
        total = torch.cat((mean, var)).sum()  # not finite exactly when the statistics are not (barring overflow)
        bad = _nonfinite(total)
        for field, value in (("mean", mean), ("var", var), (history.STAMP, history.stamp(self.current_iteration, bad))):
            history.write(getattr(self, "history_" + field), slot, value)
        count = self.nonfinite_batches
        count.copy_(torch.where(bad, count + 1, count))  # count.add_(bad) would cast bad first: four dispatches more

    def _check_captured(self, x: Tensor, captured: tuple | None) -> None:
        if captured is None or captured[1] is not x:
            bound = f"'{self._conv_name}'" if self._conv_name else "its bound conv"
            raise RuntimeError(
                f"{self._label()}: its input is not the output of {bound} in this step, so the conv's "
                "weight gradient would be wrong. Bind the layer to the nn.Conv2d that directly feeds it "
                "(cbn.convert(model) pairs them), or use compensate=False."
            )

    def _statistic_gradients(self, x: Tensor, mean: Tensor, captured: tuple[Tensor, Tensor] | None,
                             slot: int | Tensor) -> None:
        """This step's statistic gradients, written into history slot ``slot`` (straight into its
        views when the slot is an int)."""
        assert captured is not None  # forward checked it for every compensating record
        dtype = mean.dtype  # float32, or float64 for float64 inputs
        weight, bias = self._current_conv_params(dtype)
        geometry = self._geometry()
        fields = self._path_fields(geometry)
        out = {name: buffer[slot] for name, buffer in fields.items()} if isinstance(slot, int) else None
        values = self._path.compute(to_dtype(captured[0], dtype), to_dtype(x, dtype), weight, bias, geometry, out=out)
        if out is None:
            for name, value in values.items():
                history.write(fields[name], slot, value)

    @property
    def _path(self) -> GradPath:
        return GRAD_PATHS[self.grad_path]

    def _path_fields(self, geometry: ConvGeometry) -> dict[str, Tensor]:
        return {name: getattr(self, "history_" + name) for name in self._path.field_shapes(geometry)}

    def _allocate_history(self, dtype: torch.dtype, device: Any) -> None:
        """A fresh history (every slot empty): statistics and stamps, and the path's fields once bound."""
        if self.window == 1:
            return
        for field in self._path_field_names():  # a rebinding may need other fields (a conv with a bias)
            setattr(self, "history_" + field, None)
        buffers = history.empty(self._history_shapes(), dtype, device)
        for field, tensor in buffers.items():
            setattr(self, "history_" + field, tensor)

    def _compensates_with_conv(self) -> bool:
        return self.compensate and self.window > 1 and self._conv is not None

    def _path_field_names(self) -> list[str]:
        return [f.name for f in self._path.fields] if self.compensate and self.window > 1 else []

    def _history_fields(self) -> list[str]:
        if self.window == 1:  # BatchNorm2d: no history
            return []
        return ["history_" + f for f in ("mean", "var", history.STAMP, *self._path_field_names())]

    def _check_history_dtype(self, x: Tensor) -> None:
        wanted = stats_dtype(x.dtype)
        if self.history_mean.dtype != wanted:
            raise TypeError(
                f"{self._label()}: keeps its statistics in {wanted} for {x.dtype} inputs, but its history is "
                f"{self.history_mean.dtype} (the model was converted after the layer was built or bound, e.g. by "
                ".half() or .double()). Keep the model in float32 and train under autocast, or bind the layer "
                "again after converting it (cbn.convert(model) does)."
            )

    def per_rank_buffers(self) -> list[str]:
        """Buffers that belong to this process under data parallelism: the history (this device's
        past statistics, as in the paper), the iteration and the counts (cbn.keep_statistics_per_rank)."""
        return [*self._history_fields(), "current_iteration", "nonfinite_batches", "compensated_entries", "negative_variances"]

    def history_bytes(self) -> int:
        """Bytes this layer holds for past iterations (history buffers and this step's window)."""
        total = sum(b.numel() * b.element_size() for b in self._history_tensors())
        if self._window is not None:
            total += sum(t.numel() * t.element_size() for t in self._window)
        return total

    def _history_tensors(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._history_fields() if getattr(self, n, None) is not None]

    @property
    def past_statistics(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The past iterations' statistics as the last training forward used them: (means,
        variances, weights), (k-1, C) each, compensated to that iteration's weights (raw for Naive
        CBN); an entry outside the window has weight 0, mean 0 and variance 0. None before the
        first training forward with a window. ``cbn.functional.combine(mean, var, past)`` with the
        batch's own statistics gives the window statistics the layer normalized with (Eq. 9-11)."""
        if self._window is None:
            return None
        mean, var, weights = self._window
        return mean, var, weights.expand_as(mean)

    @property
    def iteration(self) -> int:
        """Index of the current training iteration: the number of iterations completed (optimizer
        steps over this layer's parameters, or in-place updates seen in eager mode). No host sync."""
        return self._host_iteration

    @property
    def slot_iterations(self) -> list[int]:
        """The iteration each history slot holds, -1 for a slot holding nothing usable (empty or
        non-finite). Reading it synchronizes with the device."""
        return [max(s, -1) for s in self.history_iteration.view(-1).tolist()]  # stamps below 0: nothing usable

    @property
    def window_entries(self) -> int:
        """How many iterations (current included) the current iteration's statistics average: the
        in-window slots holding finite statistics (with rule "drop", those used by at least one
        channel). Reading it synchronizes with the device."""
        if self.window == 1:
            return 1
        if self._fresh or self._window is None:
            return 1 + int(history.in_window(self.current_iteration, self.history_iteration, self.window).sum())
        return 1 + int(self._window[2].amax(1).sum())

    def _reset_transients(self) -> None:
        # A new process, a loaded checkpoint or a new binding holds no activations of an earlier step
        # and no window, and takes the parameters' current versions as the current iteration's.
        self._captured = None
        self._window = None
        self._versions_seen = None
        self._host_iteration = int(self.current_iteration)
        self._set_iteration_flags()
        if self.window > 1:  # a checkpoint saved mid-iteration already holds its record
            self._recorded = bool((self.history_iteration == self.current_iteration).any())

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version")  # the _version of the module that saved it
        from_cbn = prefix + "current_iteration" in state_dict or prefix + "_extra_state" in state_dict
        if from_cbn and version is not None and version > self._version:
            error_msgs.append(f"{prefix or 'layer'}: saved by a newer CrossIterationBatchNorm2d (state version {version}; "
                              f"this one reads up to {self._version}): upgrade cbn to load it")
            return
        history.upgrade(state_dict, prefix)
        wrong = history.misshapen(state_dict, prefix, self._history_shapes(), self._described())
        if wrong:
            error_msgs.extend(wrong)
            return
        if not self._compensates_with_conv():
            self._adopt_stored_path_fields(state_dict, prefix)
        for counter in ("num_batches_tracked", "current_iteration"):  # what a BatchNorm2d state lacks
            state_dict.setdefault(prefix + counter, torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.window > 1 and prefix + "history_mean" not in state_dict:
            # A BatchNorm2d's state, or a layer that never recorded: an empty history.
            self._allocate_history(self.history_mean.dtype, self.history_mean.device)
            kept = {prefix + name for name in self._history_fields()}
            missing_keys[:] = [k for k in missing_keys if k not in kept]
        self._reset_transients()

    def _history_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every history buffer's shape: the path's fields once the layer is bound."""
        path_shapes = self._path.field_shapes(self._geometry()) if self._compensates_with_conv() else {}
        return history.shapes(self.window, self.num_features, path_shapes)

    def _adopt_stored_path_fields(self, state_dict: dict, prefix: str) -> None:
        """Unbound, the path's fields have no shapes yet: take the stored ones (bind starts afresh anyway)."""
        for field in self._path_field_names():
            stored = state_dict.get(prefix + "history_" + field)
            if stored is not None:
                setattr(self, "history_" + field, torch.empty_like(stored, device=self.running_mean.device))

    def _described(self) -> str:
        bound = "" if self._conv is None else f", conv weight {tuple(self._conv.weight.shape)}"
        return f"window={self.window}, {self.num_features} channels{bound}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_captured"] = None  # transient references to one step's activations
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._versions_seen = None  # a copy's parameters have version counters of their own
        clock.register(self)  # a copy (deepcopy, pickling) advances with its own parameters

    # ------------------------------------------------------------------ non-finite batches
    def train(self, mode: bool = True) -> CrossIterationBatchNorm2d:
        if self.training and not mode:
            self._warn_nonfinite()  # leaving training: a well-defined point to read the device count
            self._warn_clock_never_advanced()
        return super().train(mode)

    def _warn_clock_never_advanced(self) -> None:
        if self._compiled_training and not self._advanced_while_compiled and self.window > 1:
            warnings.warn(
                f"{self._label()}: compiled training calls ran but its iteration never advanced: no torch "
                "optimizer step holds its parameters, and a compiled forward does not see parameters updated by "
                "hand, so it kept normalizing with one iteration's window. Call cbn.advance(model) after each "
                "update (or step a torch.optim optimizer).", RuntimeWarning, stacklevel=3)
            self._compiled_training = False  # once per layer

    def _warn_nonfinite(self) -> None:
        count = int(self.nonfinite_batches)
        if count > self._nonfinite_reported:
            warnings.warn(
                f"{self._label()}: {count - self._nonfinite_reported} training batch(es) had non-finite statistics "
                f"({count} in all); they were kept out of the window (weight 0). A diverging loss or a too-high "
                "learning rate are the usual causes; cbn.check_finite(model) raises instead.",
                RuntimeWarning, stacklevel=3)
            self._nonfinite_reported = count

    # ------------------------------------------------------------------ checks and labels
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self._label()}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels, got {x.shape[1]} (input shape "
                f"{tuple(x.shape)}); num_features must equal the producing conv's out_channels."
            )

    def _require_conv(self) -> nn.Conv2d:
        if self._conv is None:
            raise RuntimeError(
                f"{self._label()}: compensation needs the conv that produces this layer's input, and none "
                "is bound. Call cbn.convert(model) (it pairs each norm with its conv) or layer.bind(conv); "
                "or use compensate=False for Naive CBN."
            )
        return self._conv

    def _geometry(self) -> ConvGeometry:
        return ConvGeometry.of(self._require_conv())

    def _label(self) -> str:
        return f"CrossIterationBatchNorm2d '{self.name}'" if self.name else f"CrossIterationBatchNorm2d({self.num_features})"

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"window={self.window}, burn_in={self.burn_in}, grad_path={self.grad_path!r}, compensate={self.compensate}, "
            f"negative_variance={self.negative_variance!r}"
        )
        if self._conv is not None:
            text += f", conv={tuple(self._conv.weight.shape)}"
        return text


def check_finite(model: nn.Module) -> None:
    """Raise FloatingPointError if any CBN layer in model has seen a training batch whose statistics
    were not finite (one host synchronization per layer: call it where you read the loss anyway)."""
    bad = {m._label(): int(m.nonfinite_batches) for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)}
    bad = {label: count for label, count in bad.items() if count}
    if bad:
        listed = "; ".join(f"{label}: {count}" for label, count in bad.items())
        raise FloatingPointError(
            f"non-finite batch statistics (batches per layer) in {listed}. They were kept out of every window, "
            "but the loss has likely diverged: check the input for inf/nan and lower the learning rate."
        )


def negative_variance_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per CBN layer (by qualified name), (negative, compensated): how many window entries (past
    iteration x channel) came out with a negative compensated variance, and how many were
    compensated, since the layer was built. One host synchronization per layer: read it between
    steps."""
    return {name: (int(m.negative_variances), int(m.compensated_entries))
            for name, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}


def _finite(t: Tensor) -> Tensor:
    """torch.isfinite in two dispatches instead of about ten: t - t is nan exactly where t is inf
    or nan, and nan is the one value unequal to itself."""
    difference = t - t
    return difference == difference


def _nonfinite(t: Tensor) -> Tensor:
    """~torch.isfinite(t) in two dispatches (see _finite)."""
    difference = t - t
    return difference != difference


NEGATIVE_VARIANCE_RULES = ("clamp", "drop")


def _check_options(num_features: int, track_running_stats: bool, window: int, burn_in: int, grad_path: str,
                   negative_variance: str) -> None:
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"CrossIterationBatchNorm2d: num_features must be a positive int, got {num_features!r}")
    if not track_running_stats:
        raise ValueError("CrossIterationBatchNorm2d: track_running_stats=False is not supported; inference uses running statistics")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"CrossIterationBatchNorm2d: window must be an int >= 1 (1 is plain BN), got {window!r}")
    if not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"CrossIterationBatchNorm2d: burn_in must be an int >= 0 (training iterations), got {burn_in!r}")
    if grad_path not in GRAD_PATHS:
        raise ValueError(f"CrossIterationBatchNorm2d: grad_path must be one of {sorted(GRAD_PATHS)}, got {grad_path!r}")
    if negative_variance not in NEGATIVE_VARIANCE_RULES:
        raise ValueError(f"CrossIterationBatchNorm2d: negative_variance must be 'clamp' (Eq. 10) or 'drop', "
                         f"got {negative_variance!r}")


def _check_bindable(conv: nn.Module, num_features: int, label: str) -> None:
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        raise TypeError(
            f"{label}: can only bind a plain nn.Conv2d (the closed-form gradients assume it), got {type(conv).__name__}"
        )
    if conv.out_channels != num_features:
        raise ValueError(f"{label}: the conv has {conv.out_channels} output channels but the layer normalizes {num_features}")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            f"{label}: the conv uses padding={conv.padding!r}, padding_mode={conv.padding_mode!r}; CBN supports "
            "integer zero padding only. Give the conv explicit integer padding."
        )
