"""Fitting a member into a GPU memory budget: the largest micro-batch that fits, and gradient accumulation up to
the member's (effective) `batch_size`.

The search (`plan_micro_batch`) is pure logic around a probe `fits(micro_batch) -> peak bytes | None`; the real
probe (`cuda_probe`) runs two real training steps (forward, backward, optimizer step) on CUDA and is kept thin,
with its torch pieces injectable so that the logic around it is tested on a CPU-only machine. `halve_on_oom` is
the restart rule when training runs out of memory all the same, `is_out_of_memory` says what counts as that, and
`retry_on_oom` restarts only once the failed attempt's learner is gone. The other CUDA-only choices live here
too, as logic with injectable torch pieces: `bf16_native` (mixed precision) and `determinism_flags`.

What the probe guarantees: the peak memory the CUDA caching allocator RESERVED (allocated blocks, their
rounding and fragmentation) during two training steps at the member's largest stage, with all parameters
trainable and the optimizer's moments really allocated, stays under min(budget, what the card has free) minus
`SAFETY_MARGIN`. Not measured: validation and TTA passes (no gradients: smaller), kernels loaded later and
fragmentation that builds up over many epochs; the margin is for those, and the OOM restart for what is left.

Accumulation with fastai: `GradientAccumulation(n_acc=effective_batch)` counts SAMPLES, not micro-batches. It
scales every micro-batch's loss by micro/n_acc and steps once at least n_acc samples were seen, so when the
micro-batch divides the effective batch, k = effective/micro micro-batches make one step on as many samples as the
full batch. That step is only APPROXIMATELY the full batch's: BatchNorm (every fastai head has it) normalises each
micro-batch with that micro-batch's own statistics and updates its running averages k times — one SGD step
through 16 × 4 differs from 64 × 1 by 68–100 % on timm's test_convnext and test_resnet. Hence a smallest
micro-batch (`min_micro_batch`: 16 with BatchNorm, else 2, unless the member allows less): below it the budget is
an error, not a silently worse model (and a micro-batch of 1 would crash BatchNorm). A micro-batch m that does not
divide the effective batch steps every ceil(effective/m) micro-batches, on m·ceil(effective/m) samples (fewer than
ceil(effective/m) extra), with the gradient scaled up by the same small ratio. Micro-batches are therefore chosen
among the divisors of the effective batch, and a non-divisor only where no divisor lies within a factor 2 below it
(an effective batch of 97 gets 49 × 2, not 1 × 97). fastai resets its count only in before_fit and never zeroes
gradients between fits, so training zeroes them at each fit's start (`train._fit`): a phase's leftover micro-batches
would otherwise enter the next phase's first step.

torch is imported inside functions only.
"""

from __future__ import annotations

import gc
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from .errors import EnsError

Fits = Callable[[int], Optional[int]]


class MemoryBudgetError(EnsError):
    """A member does not fit its `gpu_memory` budget even one image at a time."""


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _size_text(size) -> str:
    if size is None:
        return ""
    return f"{size[0]}x{size[1]}" if isinstance(size, (tuple, list)) else str(size)


@dataclass(frozen=True)
class MicroBatchPlan:
    """How a member's effective batch is split on one device.

    `micro_batch` images go through the network at once; `accumulation_steps` micro-batches make one optimiser
    step, on `samples_per_step` images (== effective_batch when `divides`). For fastai, train with DataLoaders of
    batch size `micro_batch` and, when `accumulation_steps > 1`, `GradientAccumulation(n_acc=n_acc)` — n_acc counts
    samples and is the effective batch, not the number of steps. Such a step is `approximate`: with BatchNorm (or a
    non-dividing micro-batch) it is not the full batch's step (see the module docstring).
    """

    effective_batch: int
    micro_batch: int
    peak_bytes: Optional[int]  # measured at `micro_batch` (None after an OOM restart: not measured)
    budget_bytes: int
    probes: tuple = ()  # ((micro_batch, peak bytes or None for out of memory), ...) in the order tried
    member: str = "member"
    size: Any = None
    oom_restarts: int = 0
    limit_bytes: Optional[int] = None  # what the peak had to stay under: min(budget, free on the card) − margin
    oom_errors: tuple = ()  # the first line of each out-of-memory error that restarted training
    min_micro: int = 1  # the smallest micro-batch allowed (`min_micro_batch`): below it, a budget error
    batchnorm: bool = True  # whether the network has BatchNorm layers (which see each micro-batch on its own)

    @property
    def accumulation_steps(self) -> int:
        return math.ceil(self.effective_batch / self.micro_batch)

    @property
    def n_acc(self) -> int:
        """fastai's GradientAccumulation(n_acc=...): samples per optimiser step, i.e. the effective batch."""
        return self.effective_batch

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.accumulation_steps

    @property
    def divides(self) -> bool:
        """Whether the micro-batch divides the effective batch (each step on exactly effective_batch samples)."""
        return self.effective_batch % self.micro_batch == 0

    @property
    def approximate(self) -> bool:
        """Whether a step differs from the full batch's: accumulated with BatchNorm, or over extra samples."""
        return self.accumulation_steps > 1 and (self.batchnorm or not self.divides)

    def callbacks(self) -> list:
        """The fastai callbacks this plan needs: GradientAccumulation when more than one micro-batch per step."""
        if self.accumulation_steps == 1:
            return []
        from fastai.callback.training import GradientAccumulation

        return [GradientAccumulation(n_acc=self.n_acc)]

    def as_meta(self) -> dict:
        """For a cache entry's meta.json."""
        return {"effective_batch": self.effective_batch, "micro_batch": self.micro_batch,
                "accumulation_steps": self.accumulation_steps, "accumulation": self.steps_text(),
                "n_acc": self.n_acc, "divides": self.divides, "approximate": self.approximate,
                "min_micro_batch": self.min_micro, "batchnorm": self.batchnorm,
                "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
                "probes": [list(p) for p in self.probes], "oom_restarts": self.oom_restarts,
                "limit_bytes": self.limit_bytes, "oom_errors": list(self.oom_errors)}

    def steps_text(self) -> str:
        """'16 × 4' (micro-batch × accumulation steps), '64 × 1' without accumulation."""
        return f"{self.micro_batch} × {self.accumulation_steps}"

    def describe(self) -> str:
        if self.accumulation_steps == 1:
            return f"batch {self.micro_batch}"
        extra = "" if self.divides else f" = {self.samples_per_step} samples"
        return f"{self.steps_text()}{extra}{', approximate' if self.approximate else ''}"


# --------------------------------------------------------------------------------------------- the search
def candidates(effective_batch: int) -> list[int]:
    """The micro-batches worth trying, ascending: every divisor of the effective batch (exact accumulation), and
    ceil(B/k) for the other k only where no divisor lies in [m/2, m] (a factor 2 is what exactness may cost)."""
    b = effective_batch
    splits = {math.ceil(b / k) for k in range(1, b + 1)}  # every micro-batch that needs k steps, at its smallest
    divisors = sorted(d for d in splits if b % d == 0)  # every divisor d is ceil(b/k) for k = b/d
    out = []
    for m in sorted(splits):
        if b % m == 0 or not any(m / 2 <= d <= m for d in divisors):
            out.append(m)
    return out


def plan_micro_batch(effective_batch: int, fits: Fits, budget_bytes: int, *, member: str = "member",
                     size=None, limit_bytes: int | None = None, min_micro: int = 1,
                     batchnorm: bool = True) -> MicroBatchPlan:
    """The largest micro-batch ≤ `effective_batch` (among `candidates`, none below `min_micro` unless the
    effective batch itself is) whose probe fits the budget.

    `fits(mb)` runs one probe and returns its peak bytes, or None when it ran out of memory; a peak above
    `limit_bytes` (default `budget_bytes`; `cuda_probe`'s `fits.limit()` is lower: the card's free memory and a
    safety margin) counts as not fitting too (a probe on a larger card than the budget). Memory grows with the
    micro-batch, so: try the effective batch; on failure halve (the largest candidate ≤ half the last one) until
    one fits; then binary-search the candidates strictly between the last fitting and the first failing one.
    Halving first finds a fit in about log2(B) probes starting from the cheap side of the failure (a probe that
    fails is as slow as one that fits, but a fitting one near the answer is what the refinement needs), and the
    refinement adds about log2 of the candidates left between, so a batch of 64 takes at most 7 probes.
    """
    if effective_batch < 1:
        raise ValueError(f"effective batch must be at least 1, got {effective_batch}")
    floor = min(max(min_micro, 1), effective_batch)
    cands = [c for c in candidates(effective_batch) if c >= floor]
    cap = budget_bytes if limit_bytes is None else limit_bytes
    probes: list[tuple[int, Optional[int]]] = []
    peaks: dict[int, Optional[int]] = {}

    def ok(mb: int) -> bool:
        if mb not in peaks:
            peak = fits(mb)
            peaks[mb] = peak
            probes.append((mb, peak))
        return peaks[mb] is not None and peaks[mb] <= cap

    # halving: indices into `cands`
    hi = None  # index of the smallest candidate known to fail
    i = len(cands) - 1
    while not ok(cands[i]):
        hi = i
        if i == 0:
            usable = "" if cap == budget_bytes else (f" ({_gib(cap)} usable: what the card has free, less a "
                                                       "safety margin)")
            smallest = cands[0]
            raise MemoryBudgetError(
                f"member {member}: even a micro-batch of {smallest} at size {_size_text(size) or '?'} does not fit "
                f"gpu_memory {_gib(budget_bytes)}{usable} (peak "
                f"{_gib(peaks[smallest]) if peaks[smallest] is not None else 'out of memory'}); raise the member's "
                f"gpu_memory (if the card has more), free the GPU, lower its size or choose a smaller arch"
                + _floor_hint(smallest))
        limit = cands[i] // 2
        i = max(j for j, c in enumerate(cands) if c <= max(limit, cands[0]))
    lo = i  # the largest candidate known to fit
    # refinement: binary search over cands[lo+1 : hi]
    if hi is not None:
        a, b = lo + 1, hi - 1
        while a <= b:
            mid = (a + b) // 2
            if ok(cands[mid]):
                lo, a = mid, mid + 1
            else:
                b = mid - 1
    mb = cands[lo]
    return MicroBatchPlan(effective_batch, mb, peaks[mb], budget_bytes, tuple(probes), member, size,
                          limit_bytes=limit_bytes, min_micro=floor, batchnorm=batchnorm)


def _floor_hint(smallest: int) -> str:
    """What lowers the smallest micro-batch, where one is set above what the hardware needs."""
    if smallest <= 2:
        return ""
    return (f" (or let it accumulate smaller micro-batches: min_micro_batch below {smallest}, at the cost of "
            "noisier BatchNorm statistics)")


def min_micro_batch(member, batchnorm: bool) -> int:
    """The member's `min_micro_batch`, by default 16 where the network has BatchNorm, else 2."""
    allowed = getattr(member, "min_micro_batch", None)
    return allowed if allowed is not None else (16 if batchnorm else 2)


def halve_on_oom(plan: MicroBatchPlan, reason: str | None = None) -> MicroBatchPlan:
    """After an out-of-memory error during training (`reason`: one line of it, kept in the plan): the next
    candidate at or below half the micro-batch (so about twice the accumulation steps), unmeasured. An error when
    nothing smaller is allowed (the plan's `min_micro`, at least 1)."""
    floor = min(max(plan.min_micro, 1), plan.effective_batch)
    smaller = [c for c in candidates(plan.effective_batch) if floor <= c <= plan.micro_batch // 2]
    if not smaller:
        last = f"; last error: {reason}" if reason else ""
        raise MemoryBudgetError(
            f"member {plan.member}: ran out of memory at a micro-batch of {plan.micro_batch} at size "
            f"{_size_text(plan.size) or '?'} (gpu_memory {_gib(plan.budget_bytes)}); lower its size, choose a "
            f"smaller arch or free the GPU (another process may be using it)" + _floor_hint(plan.micro_batch) + last)
    smaller = max(smaller)
    errors = plan.oom_errors + ((reason,) if reason else ())
    return replace(plan, micro_batch=smaller, peak_bytes=None, oom_restarts=plan.oom_restarts + 1, oom_errors=errors)


# --------------------------------------------------------------------------------------------- out of memory
# RuntimeErrors of the CUDA libraries that mean "no memory left": cuBLAS cannot create its handle or workspace,
# cuDNN cannot get its workspace, or the CUDA runtime itself (which torch does not always turn into
# torch.cuda.OutOfMemoryError). Other library errors (CUDNN_STATUS_INTERNAL_ERROR, device-side asserts) are bugs
# or broken drivers, not something a smaller micro-batch cures.
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(exc: BaseException, cuda=None) -> bool:
    """Whether `exc` is the GPU running out of memory: torch.cuda.OutOfMemoryError, or a RuntimeError of cuBLAS,
    cuDNN or the CUDA runtime failing to allocate (`OOM_MESSAGES`). Host memory (MemoryError) is not. `cuda`
    (default torch.cuda) is injectable."""
    if cuda is None:
        import torch

        cuda = torch.cuda
    if isinstance(exc, cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def oom_reason(exc: BaseException, limit: int = 200) -> str:
    """One line for the record: the error's line that says out of memory (fastai puts "Exception occured in
    `Callback` when calling event ..." before the message of an error raised in a callback), else its first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((line for line in lines if any(m in line for m in OOM_MESSAGES)), lines[0] if lines else "")
    text = f"{type(exc).__name__}: {line}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def free_memory(cuda=None) -> None:
    """Collect garbage (a fastai Learner sits in reference cycles: its callbacks point back at it, so reference
    counting alone never frees it) and hand the caching allocator's free blocks back to the driver."""
    gc.collect()
    if cuda is None:
        import torch

        cuda = torch.cuda
    cuda.empty_cache()


def reset_autocast() -> None:
    """Leave any autocast an interrupted step left entered. fastai's MixedPrecision enters autocast in
    before_batch and leaves it in after_loss, so an out-of-memory error in the forward pass leaves it on, one
    level deep: the retry's autocast then never gets back to level 0, which is when torch clears its cache of
    half-precision weight copies — so the old model's copies stay on the GPU, and the new model's first copies
    are reused after every optimizer step (stale weights). Call outside any autocast of one's own."""
    import torch

    depth = torch.autocast_increment_nesting() - 1  # torch has no getter: up and down again reads the level
    torch.autocast_decrement_nesting()
    for _ in range(depth):
        torch.autocast_decrement_nesting()
    torch.clear_autocast_cache()
    for device_type in ("cuda", "cpu"):
        torch.set_autocast_enabled(device_type, False)


def retry_on_oom(attempt: Callable[[Optional[MicroBatchPlan]], Any], plan: Optional[MicroBatchPlan],
                 on_restart: Callable[[MicroBatchPlan, str], None] | None = None, *, cuda=None):
    """`attempt(plan)`, restarted with half the micro-batch (`halve_on_oom`) after each out-of-memory error
    (`is_out_of_memory`) until it succeeds or the micro-batch is 1. Without a plan (the CPU) nothing is retried.

    The failed attempt's learner is alive as long as the exception is: its traceback holds the frames that hold
    it. So the except block only records the error; once out of it (the exception and its traceback unreferenced)
    the autocast it may have left on is reset, the garbage collected (fastai's reference cycles) and the cache
    emptied, and only then is the next attempt built: never two models side by side. `on_restart(plan, reason)`
    hears of each restart."""
    while True:
        reason = None
        try:
            return attempt(plan)
        except Exception as exc:
            if plan is None or not is_out_of_memory(exc, cuda):
                raise
            reason = oom_reason(exc)
        # out of the except block: `exc` is unbound and no traceback holds the failed attempt's frames any more
        reset_autocast()
        free_memory(cuda)
        plan = halve_on_oom(plan, reason)  # raises when the micro-batch is already 1
        if on_restart is not None:
            on_restart(plan, reason)


# --------------------------------------------------------------------------------------------- the CUDA probe
def probe_size(member) -> tuple[int, int]:
    """(height, width) of the member's largest stage (by area): where memory peaks."""
    sizes = [s if isinstance(s, (tuple, list)) else (s, s) for s, _ in member.stage_plan]
    h, w = max(sizes, key=lambda s: s[0] * s[1])
    return int(h), int(w)


_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}

# What the probe's peak reserved memory must leave free under min(budget, free on the card). Two steps measure
# the training step itself; not measured are kernels loaded lazily later (CUDA_MODULE_LOADING=LAZY: cuDNN/cuBLAS
# kernels of the validation and TTA passes and of the last, smaller batch; tens to a few hundred MiB, outside the
# allocator), blocks the allocator cannot reuse after many epochs at varying shapes (progressive resizing, the
# last partial batch), and a display or another process taking a little more of the card meanwhile. 512 MiB is
# about 7 % of an 8 GB card: enough for those, small enough not to halve micro-batches that would have fitted.
SAFETY_MARGIN = 512 * 2**20


def usable_bytes(budget_bytes: int, available_bytes: int, margin: int = SAFETY_MARGIN) -> int:
    """What a probe's peak reserved memory may reach: the budget or what the card really offers this process
    (free memory plus what it holds already), whichever is less, minus the safety margin."""
    return min(budget_bytes, available_bytes) - margin


def probe_optimizer(params):
    """The optimizer a fastai Learner creates (opt_func=Adam: fastai's Adam, moments allocated on the first
    step), with learning rate 0 so that the probe's steps move no weight (they are restored all the same)."""
    from fastai.optimizer import Adam

    return Adam(list(params), lr=0.0)


def cuda_probe(model_factory_or_learner, size, budget_bytes: int, precision: str, *, cuda=None,
               device: str = "cuda", limit_memory: bool = True, optimizer: Callable | None = None,
               margin: int = SAFETY_MARGIN) -> Fits:
    """`fits(micro_batch) -> peak bytes | None` for `plan_micro_batch`: two training steps (forward, backward,
    optimizer step; all parameters trainable, as in an unfrozen fine-tune) on random batches of `size` (h, w)
    under the member's autocast `precision`. The second step runs with the first one's moments and gradients
    alive, as every step of training after the first does. The peak is torch.cuda's max_memory_reserved — what
    the caching allocator took from the card, rounding and fragmentation included, not only what tensors
    occupied. Out of memory (`is_out_of_memory`, cuBLAS and cuDNN allocation failures included) returns None.

    `fits.limit()` is what the peak must stay under: `usable_bytes(budget, free + reserved, margin)`, measured
    with the model on the device (`plan_member` passes it to `plan_micro_batch`).

    `model_factory_or_learner`: a fastai Learner (its `.model`), an nn.Module, or a callable building one (built
    once, on the first probe). `optimizer(params)` builds the probe's optimizer (default `probe_optimizer`,
    fastai's Adam as the Learner makes it). The model is left as found: weights (a host copy is put back: no
    device memory), training mode, requires_grad flags, BatchNorm statistics, gradients and the random
    generators (dropout, the input) are restored after each probe, so probing a learner before training leaves
    its run reproducible.

    `limit_memory`: cap this process at budget/total of the card (`memory_cap`: set_per_process_memory_fraction,
    which caps reserved memory) so that a larger card runs out of memory where the budget would.
    `fits.release()` drops the model when planning is done and puts the process's previous cap back (training
    holds its own cap, `train.train_member`). `fits.batchnorm()` says whether the model has BatchNorm layers.
    `cuda` (default `torch.cuda`) and `device` are injectable, for tests on CPU.
    """
    import torch

    cuda = torch.cuda if cuda is None else cuda
    make_optimizer = probe_optimizer if optimizer is None else optimizer
    h, w = (size, size) if isinstance(size, int) else size
    state: dict = {}

    def model():
        if "model" not in state:
            obj = model_factory_or_learner
            if isinstance(obj, torch.nn.Module):
                m = obj
            elif isinstance(getattr(obj, "model", None), torch.nn.Module):  # a fastai Learner
                m = obj.model
            else:
                m = obj()
            state["model"] = m.to(device)
            if limit_memory:
                state["cap"] = memory_cap(budget_bytes, cuda)
                state["cap"].__enter__()
        return state["model"]

    def steps(net, mb: int) -> None:
        """Two training steps; their tensors (batches, activations, the optimizer and its moments) die with this
        frame (or, after out of memory, once the exception is handled)."""
        opt = make_optimizer([p for p in net.parameters() if p.requires_grad])
        for _ in range(2):
            x = torch.randn(mb, 3, h, w, device=device)
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=enabled):
                out = net(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                target = torch.randint(0, out.shape[-1], (mb,), device=device)
                loss = torch.nn.functional.cross_entropy(out.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad()  # fastai's zeroes the gradients in place: they stay allocated, as in training
        if hasattr(cuda, "synchronize"):
            cuda.synchronize()

    enabled = precision in _DTYPES
    dtype = getattr(torch, _DTYPES.get(precision, "float32"))

    def fits(mb: int) -> Optional[int]:
        net = model()
        was_training = net.training
        flags = [p.requires_grad for p in net.parameters()]
        buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
        weights = [p.detach().to("cpu", copy=True) for p in net.parameters()]
        rng_devices = [] if torch.device(device).type != "cuda" else [cuda.current_device()]
        peak = None
        try:
            cuda.empty_cache()
            cuda.reset_peak_memory_stats()
            with torch.random.fork_rng(devices=rng_devices):
                for p in net.parameters():
                    p.requires_grad_(True)
                net.train()
                steps(net, mb)
            peak = int(cuda.max_memory_reserved())
        except Exception as exc:
            if not is_out_of_memory(exc, cuda):
                raise
        finally:
            net.zero_grad(set_to_none=True)
            for p, f in zip(net.parameters(), flags):
                p.requires_grad_(f)
            net.train(was_training)
            with torch.no_grad():
                for k, v in net.named_buffers():
                    v.copy_(buffers[k])
                for p, saved in zip(net.parameters(), weights):
                    p.copy_(saved)
        if peak is None:
            free_memory(cuda)  # the error's traceback held the step's frames: collect whatever cycles it left
        else:
            cuda.empty_cache()  # the step's tensors died with its frame (no cycles): no collection needed
        return peak

    def limit() -> int:
        """min(budget, free on the card + reserved by this process) − margin, with the model on the device."""
        model()
        free_memory(cuda)
        free, _total = cuda.mem_get_info()
        return usable_bytes(budget_bytes, int(free) + int(cuda.memory_reserved()), margin)

    def release() -> None:
        """Drop the probe's reference to the model (and the cached blocks) and put the previous memory cap back:
        call once the plan is made."""
        cap = state.pop("cap", None)
        state.clear()
        free_memory(cuda)
        if cap is not None:
            cap.__exit__(None, None, None)

    def batchnorm() -> bool:
        return has_batchnorm(model())

    fits.limit = limit
    fits.release = release
    fits.batchnorm = batchnorm
    return fits


def has_batchnorm(model) -> bool:
    """Whether `model` normalises with batch statistics in training (BatchNorm1d/2d/3d, SyncBatchNorm)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def memory_fraction(cuda) -> float:
    """The process's current cap on the card, as a fraction of it (1.0, torch's default, where torch has no
    getter)."""
    get = getattr(cuda, "get_per_process_memory_fraction", None)
    return 1.0 if get is None else float(get())


@contextmanager
def memory_cap(budget_bytes: int, cuda=None):
    """Caps this process's CUDA caching allocator at `budget_bytes` (as budget/total of the card) inside the block
    and puts the previous cap back after it, however it ends: a member's budget must not outlive its fit (`ens
    tune`'s trials, Ray workers reused across tasks and benchmarks train several members in one process). Nothing
    without a CUDA card. `cuda` (default torch.cuda) is injectable."""
    if cuda is None:
        import torch

        cuda = torch.cuda
    if not cuda.is_available():
        yield
        return
    previous = memory_fraction(cuda)
    total = cuda.get_device_properties(0).total_memory
    cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
    try:
        yield
    finally:
        cuda.set_per_process_memory_fraction(previous)


def plan_member(member, model_factory_or_learner, precision: str, *, budget_bytes: int | None = None,
                probe: Callable[..., Fits] = cuda_probe) -> MicroBatchPlan:
    """The micro-batch plan of `member` on CUDA: its `gpu_memory` budget (less what the card lacks and the
    safety margin, when the probe knows them: `fits.limit()`), its largest stage size."""
    from .config import parse_bytes

    budget = parse_bytes(member.gpu_memory) if budget_bytes is None else budget_bytes
    size = probe_size(member)
    fits = probe(model_factory_or_learner, size, budget, precision)
    try:
        limit = fits.limit() if callable(getattr(fits, "limit", None)) else None
        # a probe that cannot tell is taken to have BatchNorm: every fastai head does
        batchnorm = fits.batchnorm() if callable(getattr(fits, "batchnorm", None)) else True
        return plan_micro_batch(member.batch_size, fits, budget, member=member.name, size=size, limit_bytes=limit,
                                min_micro=min_micro_batch(member, batchnorm), batchnorm=batchnorm)
    finally:
        getattr(fits, "release", lambda: None)()


# --------------------------------------------------------------------------------------------- precision, determinism
def bf16_native(cuda=None) -> bool:
    """Whether the CUDA card computes in bf16 natively (compute capability 8.0 and later: A100, RTX 30xx, L4,
    H100). torch's plain `is_bf16_supported()` also says yes where bf16 is only emulated (P100, V100, T4 — Kaggle's
    free GPUs — and RTX 20xx), which is slower than fp16 there. Asks `is_bf16_supported(including_emulation=False)`
    where torch has that argument, else compares the capability. `cuda` (default torch.cuda) is injectable."""
    import inspect

    if cuda is None:
        import torch

        cuda = torch.cuda
    if not cuda.is_available():
        return False
    query = cuda.is_bf16_supported
    try:
        has_argument = "including_emulation" in inspect.signature(query).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        has_argument = False
    if has_argument:
        return bool(query(including_emulation=False))
    return tuple(cuda.get_device_capability()) >= (8, 0)


def determinism_flags(deterministic: bool | None, device: str) -> dict:
    """torch's switches for a member's `deterministic` on `device` ("cuda" or "cpu").

    None is the default: deterministic on the CPU (as ens always was; the resume tests compare probabilities to
    1e-6), fast on CUDA: cudnn.benchmark picks the fastest convolution algorithms for each shape (10–30 % on
    convnets), which may differ from run to run. True on CUDA: no benchmark, cuDNN's deterministic algorithms and
    torch.use_deterministic_algorithms (warn-only: an op without a deterministic CUDA kernel, e.g. adaptive
    average pooling's backward, warns and stays nondeterministic). On the CPU torch's kernels are deterministic
    already, so use_deterministic_algorithms (which also fills every new empty tensor with NaN, a cost) stays off."""
    det = (device != "cuda") if deterministic is None else bool(deterministic)
    cuda = device == "cuda"
    return {"deterministic": det, "cudnn_benchmark": cuda and not det, "cudnn_deterministic": det,
            "deterministic_algorithms": cuda and det}


def set_determinism(deterministic: bool | None, device: str) -> bool:
    """Sets torch's process-wide switches to `determinism_flags(deterministic, device)` — every one of them, both
    ways, since an earlier member in this process may have set them otherwise. Returns whether the run is
    deterministic. Bit-exact cuBLAS needs CUBLAS_WORKSPACE_CONFIG before cuBLAS's first use in the process; it is
    set here (if unset), which is in time when this runs before anything touched the GPU."""
    import torch

    flags = determinism_flags(deterministic, device)
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    if flags["deterministic_algorithms"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(flags["deterministic_algorithms"], warn_only=True)
    return flags["deterministic"]
