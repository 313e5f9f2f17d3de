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

from cbn.functional import CrossIterationNorm, constant, stats_dtype, to_dtype
from cbn.statgrad import GRAD_PATHS, ConvGeometry

_UNSET = object()  # the current iteration's compensated window has not been computed yet


PROFILER_LABELS = ("cbn::compensate_window", "cbn::normalize", "cbn::record_history", "cbn::statistic_gradients",
                   "cbn::running_stats")


def profiled(label: str):
    """A torch.profiler range named label while a profiler records (so reports can group CBN's own
    work, PROFILER_LABELS), and nothing at all otherwise: no dispatcher call in ordinary training."""
    return record_function(label) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


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

    What an iteration is: the window advances when the parameters that the layer depends on (the
    bound conv's weight and bias, and its own gamma and beta) have been updated in place, which is
    what every torch optimizer does; the layer watches their version counters. So gradient
    checkpointing's recompute, a module called twice in one step, or a profiling pass between
    optimizer steps see the same window and never push extra history. Only the first grad-enabled
    training call of an iteration is recorded (calls under ``torch.no_grad()`` never are). A conv
    that is never updated therefore never advances the window. Save checkpoints between iterations.

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

    Under torch.compile: evaluation mode compiles into the surrounding graph. A training call
    breaks the graph once, at ``_begin_step``: telling iterations apart reads the parameters'
    version counters and per-step Python state (iteration, slots), which dynamo would otherwise
    guard on and recompile for at every step; that bookkeeping runs eagerly, everything else
    (statistics, compensation, normalization, history writes) is compiled. The graphs settle once
    the window is full (tested: 7 graphs, 3 breaks for a two-layer net, the same after 8 steps
    as after 20). Each break splits the enclosing modules' frames, and dynamo compiles a shared
    frame once per distinct layer shape: in a network with many distinct CBN layers (ResNet-18
    has 20) some frames reach ``torch._dynamo.config.recompile_limit`` (8) and run eagerly,
    correct but uncompiled; raise the limit to compile them all.

    The layer must be bound to the nn.Conv2d whose output it normalizes (``bind`` or ``cbn.convert``)
    before it trains with compensation. It checks at run time that its input is that conv's output.
    """

    # 2: history_valid (one flag per slot) added; a version-1 state gets it from its slot iterations.
    # 3: history_offset_mean and history_offset_sq dropped (they equal mu and 2 nu; see _compensate).
    _version = 3

    # Parameters and buffers (register_parameter / register_buffer), declared for type checkers.
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    nonfinite_batches: Tensor
    compensated_entries: Tensor
    negative_variances: Tensor
    # The history: None until the first record (or a loaded checkpoint); the path's fields
    # (history_grad_mean, ...) are reached by name.
    history_mean: Tensor | None
    history_var: Tensor | None
    history_valid: Tensor | None
    # Per-step transients (_reset_transients)
    _captured: tuple[Tensor, Tensor] | None
    _last_clock: tuple[int, ...] | None
    _window_cache: Any  # _UNSET, None or (means, variances, weights)

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
        # Window entries (past iteration x channel) compensated, and those whose compensated
        # variance was negative (clamped or dropped by the rule), summed over iterations, on the device.
        for counter in ("compensated_entries", "negative_variances"):
            self.register_buffer(counter, torch.tensor(0, dtype=torch.long, device=device), persistent=False)
        # History of past iterations, one slot per past step (window - 1 slots), allocated on first
        # use; None buffers are neither saved nor loaded.
        for field in self._history_fields():
            self.register_buffer(field, None)
        self._conv: nn.Conv2d | None = None
        self._conv_name: str | None = None
        self._conv_hook: RemovableHandle | None = None
        self._iteration = -1  # index of the current training iteration
        self._slot_iterations = [-1] * (window - 1)  # iteration held by each history slot, -1 if empty
        self._reset_transients()

    # ------------------------------------------------------------------ binding
    def bind(self, conv: nn.Conv2d, name: str | None = None, conv_name: str | None = None) -> CrossIterationBatchNorm2d:
        """Use ``conv``'s weight (and bias) for the compensation; conv must feed this layer directly.

        Binding starts a fresh history. ``name`` and ``conv_name`` only label error messages.
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
        self._reset_history()
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

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        plain, fresh, slot, captured = self._begin_step(x)
        if plain:
            return self._batch_norm(x)
        # The statistics, the history and the compensation run with autocast off: the compensation
        # subtracts nearly equal dot products, which bfloat16/float16 would cancel away.
        with torch.autocast(x.device.type, enabled=False):
            if fresh:
                with profiled("cbn::compensate_window"):
                    self._window_cache = self._past_window()
            past = self._window_cache
            with profiled("cbn::normalize"):
                past_mean, past_var, past_weights = past if past is not None else (None, None, None)
                out, mean, var, mean_bar, var_bar, count = CrossIterationNorm.apply(
                    x, self.weight, self.bias, past_mean, past_var, past_weights, self.eps)
            if slot is not None:
                with profiled("cbn::record_history"):
                    self._record(slot, x, mean, var, captured)
            with profiled("cbn::running_stats"):
                self._update_running_stats(mean_bar, var_bar, count)
        return out

    @torch.compiler.disable
    def _begin_step(self, x: Tensor) -> tuple[bool, bool, int | None, tuple | None]:
        """The host-side bookkeeping of a training call, kept out of torch.compile's graphs (it reads
        parameters' version counters and per-step Python state, which dynamo would guard on and
        recompile for every step). Returns (plain, fresh, slot, captured):

        * plain: no window can exist this iteration (window 1, burn-in, empty input): run BatchNorm.
          The choice must not depend on whether this call records, or a checkpoint's recompute would
          run different ops.
        * fresh: this iteration's compensated window is still to be computed (first call of the
          iteration); afterwards ``_window_cache`` holds it (None while no slot was ever filled).
        * slot: the history slot this call records into, or None if it records nothing (dynamo
          passes a changing int from a graph break on as a symbolic int: no recompile per slot).
        * captured: the bound conv's (input, output) of this step, for the statistic gradients.
        """
        if self.compensate and self.window > 1:
            self._require_conv()  # fail on the first training step, not after burn-in
        captured, self._captured = self._captured, None
        self._advance_iteration()
        if self.window == 1 or self._iteration < self.burn_in or x.numel() == 0:
            return True, False, None, None
        fresh = self._window_cache is _UNSET
        if fresh:
            if self.history_mean is None:
                self._window_cache, fresh = None, False
            else:
                self._drop_stale_slots()
        if not self._should_record():
            return False, fresh, None, None
        if self.compensate:
            self._check_captured(x, captured)
        slot = self._iteration % (self.window - 1)
        self._allocate_history(x)
        self._slot_iterations[slot] = self._iteration
        return False, fresh, slot, captured

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

    # ------------------------------------------------------------------ iterations and history
    def _clock(self) -> tuple[int, ...]:
        tensors: list[Tensor | None] = [self.weight, self.bias]
        if self._conv is not None:
            tensors += [self._conv.weight, self._conv.bias]
        versions = tuple(t._version for t in tensors if t is not None)
        if not versions:
            raise RuntimeError(
                f"{self._label()}: cannot tell training iterations apart: it has no affine parameters "
                "and no bound conv. Bind it to the conv that feeds it (layer.bind(conv) or cbn.convert(model))."
            )
        return versions

    def _advance_iteration(self) -> None:
        clock = self._clock()
        if clock != self._last_clock:
            self._last_clock = clock
            self._iteration += 1
            self._window_cache = _UNSET

    def _should_record(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return self._slot_iterations[self._iteration % (self.window - 1)] != self._iteration

    def _past_slots(self) -> list[int]:
        """Slots holding the iterations t-k+1 .. t-1 (older or unfilled slots are skipped)."""
        t = self._iteration
        return [s for s, it in enumerate(self._slot_iterations) if it >= 0 and t - self.window < it < t]

    def _drop_stale_slots(self) -> None:
        """Empty the slots that left the window (after an iteration that recorded nothing), so that
        every filled slot is in the window and the window is always all slots, weighed by validity."""
        keep = self._past_slots()
        assert self.history_valid is not None  # called once a slot was filled
        for s, it in enumerate(self._slot_iterations):
            if it >= 0 and s not in keep:
                self.history_valid[s].fill_(False)
                self._slot_iterations[s] = -1

    @torch.no_grad()
    def _past_window(self) -> tuple[Tensor, Tensor, Tensor]:
        """This iteration's compensated past (mean, var) for every slot and channel, (k-1, C) each,
        and their weights, (k-1, C): 1 for an entry in the window, 0 for an empty slot, a non-finite
        record or (rule "drop") a negative compensated variance; a weight-0 entry's mean and var
        are 0. Computed once per iteration, for all slots at once: no per-slot ops."""
        mean, var, valid = self.history_mean, self.history_var, self.history_valid
        assert mean is not None and var is not None and valid is not None  # called once a slot was filled
        keep = valid.unsqueeze(1)
        if self.compensate:
            mean, var = self._compensate(mean, var)
            # Finite records can still compensate to inf or nan (a gradient field that overflowed,
            # a huge weight change): such a slot drops out of this window too.
            keep = keep & _finite((mean + var).sum(1, keepdim=True))
            negative = torch.lt(var, constant(0.0, var.dtype)).logical_and_(keep)
            # count_nonzero: two dispatches, where a bool sum converts to long first (seven).
            self.compensated_entries.add_(keep.count_nonzero(), alpha=mean.shape[1])
            self.negative_variances.add_(negative.count_nonzero())
            if self.negative_variance == "drop":
                keep = keep & ~negative
            var = var.clamp_min(0.0)  # Eq. 10's max(nu, mu^2); a dropped entry's is zeroed below
        keep = keep.expand_as(mean)
        # A fresh tensor: the cache must not see a later record in this iteration.
        weights = keep.to(mean.dtype)
        # torch.where copies a CPU scalar tensor to another device, with a host sync: off CPU, a device zero.
        zero = constant(0.0, mean.dtype) if mean.device.type == "cpu" else mean.new_zeros(())
        return torch.where(keep, mean, zero), torch.where(keep, var, zero), weights

    def _compensate(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 7-8 for all slots: the recorded (mean, var) moved to the current conv weights.

        The Taylor term needs the linear forms L at the current weights and at the recording ones,
        and the latter are the recorded statistics themselves: mu and nu are homogeneous of degree
        1 and 2 in the conv's (weight, bias), so by Euler's theorem L_mu(theta_past) = mu_past and
        L_nu(theta_past) = 2 nu_past. Hence mu_now = L_mu(theta_t), exact since mu is linear, and
        nu_now = nu_past + L_nu(theta_t) - 2 nu_past = L_nu(theta_t) - nu_past."""
        path = GRAD_PATHS[self.grad_path]
        fields = {f: getattr(self, "history_" + f) for f in path.field_shapes(self._geometry())}
        weight, bias = self._current_conv_params(mean.dtype)
        mean_now, lin_sq = path.linear(fields, weight, bias, mean)
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
    def _record(self, slot: int, x: Tensor, mean: Tensor, var: Tensor, captured: tuple[Tensor, Tensor] | None) -> None:
        """Store this iteration's statistics (and what compensating them later needs) in its slot.

        The entry's validity is decided on the device: a non-finite entry is stored with weight 0,
        so it never enters a window, and counted in ``nonfinite_batches``; no host sync."""
        if self.compensate:
            with profiled("cbn::statistic_gradients"):
                self._statistic_gradients(x, mean, captured, slot)
        total = torch.cat((mean, var)).sum()  # not finite exactly when the statistics are not (barring overflow)
        finite = _finite(total)
        for field, value in (("mean", mean), ("var", var), ("valid", finite)):
            getattr(self, "history_" + field)[slot].copy_(value)
        count = self.nonfinite_batches
        count.copy_(torch.where(finite, count, count + 1))

    def _check_captured(self, x: Tensor, captured: tuple | None) -> None:
        if captured is None or captured[1] is not x:
            bound = f"'{self._conv_name}'" if self._conv_name else "its bound conv"
            raise RuntimeError(
                f"{self._label()}: its input is not the output of {bound} in this step, so the conv's "
                "weight gradient would be wrong. Bind the layer to the nn.Conv2d that directly feeds it "
                "(cbn.convert(model) pairs them), or use compensate=False."
            )

    def _statistic_gradients(self, x: Tensor, mean: Tensor, captured: tuple[Tensor, Tensor] | None, slot: int) -> None:
        """This step's statistic gradients, written straight into history slot ``slot``."""
        assert captured is not None  # _begin_step checked it for every compensating record
        dtype = mean.dtype  # float32, or float64 for float64 inputs
        weight, bias = self._current_conv_params(dtype)
        path = GRAD_PATHS[self.grad_path]
        geometry = self._geometry()
        out = {f: getattr(self, "history_" + f)[slot] for f in path.field_shapes(geometry)}
        path.compute(to_dtype(captured[0], dtype), to_dtype(x, dtype), weight, bias, geometry, out=out)

    def _allocate_history(self, x: Tensor) -> None:
        """The history buffers, (k-1, *field shape) each, as zeros (empty, weight 0), made on the
        first record (from a checkpoint, the buffers exist already)."""
        if self.history_mean is None:
            dtype = stats_dtype(x.dtype)
            shapes = {"mean": (self.num_features,), "var": (self.num_features,), "valid": ()}
            if self.compensate:
                shapes.update(GRAD_PATHS[self.grad_path].field_shapes(self._geometry()))
            for field, shape in shapes.items():
                kind = torch.bool if field == "valid" else dtype
                setattr(self, "history_" + field, torch.zeros((self.window - 1, *shape), dtype=kind, device=x.device))

    def _history_fields(self) -> list[str]:
        names = ["history_mean", "history_var", "history_valid"]
        if self.compensate and self.window > 1:
            names += ["history_" + f for f in _all_path_fields(self.grad_path)]
        return names

    def per_rank_buffers(self) -> list[str]:
        """Buffers that belong to this process under data parallelism: the history (this device's
        past statistics, as in the paper) and the non-finite batch count (cbn.keep_statistics_per_rank)."""
        return [*self._history_fields(), "nonfinite_batches", "compensated_entries", "negative_variances"]

    def history_bytes(self) -> int:
        """Bytes this layer holds for past iterations (history buffers and this step's window)."""
        total = sum(b.numel() * b.element_size() for b in self._history_tensors())
        if isinstance(self._window_cache, tuple):
            total += sum(t.numel() * t.element_size() for t in self._window_cache)
        return total

    def _history_tensors(self) -> list[Tensor]:
        return [getattr(self, n) for n in self._history_fields() if getattr(self, n) is not None]

    @property
    def past_statistics(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The past iterations' statistics as the last training forward used them: (means,
        variances, weights), (k-1, C) each, compensated to that iteration's weights (raw for Naive
        CBN); an entry outside the window has weight 0, mean 0 and variance 0. None
        while no window exists. ``cbn.functional.combine(mean, var, past)`` with the batch's own
        statistics gives the window statistics the layer normalized with (Eq. 9-11)."""
        return self._window_cache if isinstance(self._window_cache, tuple) else None

    @property
    def iteration(self) -> int:
        """Index of the current training iteration (-1 before the first training forward)."""
        return self._iteration

    @property
    def window_entries(self) -> int:
        """How many iterations (current included) the current iteration's statistics average: the
        in-window slots holding finite statistics (with rule "drop", those used by at least one
        channel). Reading it synchronizes with the device."""
        if self._window_cache is _UNSET:
            slots = self._past_slots()
            return 1 + (int(self.history_valid[slots].sum()) if slots and self.history_valid is not None else 0)
        return 1 + (0 if self._window_cache is None else int(self._window_cache[2].amax(1).sum()))

    def _reset_transients(self) -> None:
        # A new process, a loaded checkpoint or a new binding starts a new iteration at its first
        # training forward, and holds no activations of an earlier step.
        self._captured = None
        self._last_clock = None
        self._window_cache = _UNSET

    def _reset_history(self) -> None:
        for name in self._history_fields():
            setattr(self, name, None)
        self._slot_iterations = [-1] * (self.window - 1)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Tensor:
        # [iteration, iteration held by each slot...]: an int64 tensor rather than a dict, because
        # jit tracing (and so fvcore) passes every state_dict entry through as a traced value.
        return torch.tensor([self._iteration, *self._slot_iterations], dtype=torch.long)

    def set_extra_state(self, state: Tensor) -> None:
        values = [int(v) for v in state.tolist()]
        if len(values) != self.window:
            raise ValueError(
                f"{self._label()}: the checkpoint holds {len(values) - 1} history slots but window={self.window} "
                f"needs {self.window - 1}; build the layer with the window the checkpoint was trained with."
            )
        self._iteration, self._slot_iterations = values[0], values[1:]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        _upgrade_state(state_dict, prefix, local_metadata.get("version"))
        wrong = self._misshapen_history(state_dict, prefix)
        if wrong:
            error_msgs.extend(wrong)
            return
        # History buffers are allocated lazily, so give them the stored shapes before loading.
        for name in self._history_fields():
            stored = state_dict.get(prefix + name)
            device = self.running_mean.device
            setattr(self, name, None if stored is None else torch.empty_like(stored, device=device))
        extra_key = prefix + "_extra_state"
        from_batchnorm = extra_key not in state_dict  # a BatchNorm2d (or pre-versioning) state
        version = local_metadata.get("version")  # the _version of the layer that saved it
        if not from_batchnorm and version is not None and version > self._version:
            error_msgs.append(f"{prefix or 'layer'}: saved by a newer CrossIterationBatchNorm2d (state version {version}; "
                              f"this one reads up to {self._version}): upgrade cbn to load it")
            return
        if from_batchnorm:
            self._iteration = -1
            self._slot_iterations = [-1] * (self.window - 1)
            if prefix + "num_batches_tracked" not in state_dict:
                state_dict[prefix + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if from_batchnorm and extra_key in missing_keys:
            missing_keys.remove(extra_key)
        self._reset_transients()

    def _misshapen_history(self, state_dict: dict, prefix: str) -> list[str]:
        """One message per stored history buffer whose shape does not fit this layer: its window
        and channels, and, once bound, its conv's geometry (unbound, the path's fields are checked
        against the conv when it is bound: bind starts a fresh history)."""
        slots = self.window - 1
        expected: dict[str, tuple[int, ...]] = {"mean": (slots, self.num_features), "var": (slots, self.num_features),
                                                "valid": (slots,)}
        if self._conv is not None and self.compensate and self.window > 1:
            shapes = GRAD_PATHS[self.grad_path].field_shapes(self._geometry())
            expected.update({field: (slots, *shape) for field, shape in shapes.items()})
        bound = "" if self._conv is None else f", conv weight {tuple(self._conv.weight.shape)}"
        out = []
        for field, shape in expected.items():
            stored = state_dict.get(prefix + "history_" + field)
            if stored is not None and tuple(stored.shape) != shape:
                out.append(f"{prefix}history_{field}: the checkpoint holds shape {tuple(stored.shape)}, but this layer "
                           f"(window={self.window}, {self.num_features} channels{bound}) keeps {shape}; load it into a "
                           "layer built and bound as the one that saved it")
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_captured"] = None  # transient references to one step's activations
        return state

    # ------------------------------------------------------------------ non-finite batches
    def train(self, mode: bool = True) -> CrossIterationBatchNorm2d:
        if self.training and not mode:
            self._warn_nonfinite()  # leaving training: a well-defined point to read the device count
        return super().train(mode)

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


def _upgrade_state(state_dict: dict, prefix: str, version: int | None) -> None:
    """Convert an older layer's state in place. Version 1 had no validity flags; every slot it
    had filled held finite statistics (it refused non-finite ones). Versions 1 and 2 also stored
    each slot's linear forms at its recording weights, which are its mean and twice its mean square."""
    if version == 1 and prefix + "history_mean" in state_dict and prefix + "history_valid" not in state_dict:
        slots = state_dict[prefix + "_extra_state"][1:]
        state_dict[prefix + "history_valid"] = (slots >= 0).to(state_dict[prefix + "history_mean"].device)
    if version in (1, 2):
        for field in ("history_offset_mean", "history_offset_sq"):
            state_dict.pop(prefix + field, None)


def _all_path_fields(grad_path: str) -> list[str]:
    # Field names only (shapes need a bound conv); bias Jacobians exist only for convs with bias.
    if grad_path == "efficient":
        return ["grad_mean", "grad_sq"]
    return ["jac_mean_weight", "jac_sq_weight", "jac_mean_bias", "jac_sq_bias"]


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
