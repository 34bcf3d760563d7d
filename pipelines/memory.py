"""Fitting a member into a GPU memory budget: the largest micro-batch that fits, and gradient accumulation up to
the member's (effective) `batch_size`.

The search (`plan_micro_batch`) is pure logic around a probe `fits(micro_batch) -> peak bytes | None`; the real
probe (`cuda_probe`) runs one forward and backward pass on CUDA and is kept thin, with its torch pieces
injectable so that the logic around it is tested on a CPU-only machine. `halve_on_oom` is the restart rule when
training runs out of memory all the same.

Accumulation with fastai: `GradientAccumulation(n_acc=effective_batch)` counts SAMPLES, not micro-batches. It
scales every micro-batch's loss by micro/n_acc and steps once at least n_acc samples were seen, so when the
micro-batch divides the effective batch, k = effective/micro micro-batches make one step whose gradient is the
full batch's mean, exactly. A micro-batch m that does not divide it steps every ceil(effective/m) micro-batches,
on m·ceil(effective/m) samples (fewer than ceil(effective/m) extra), with the gradient scaled up by the same small
ratio. Micro-batches are therefore chosen among the divisors of the effective batch, and a non-divisor only where
no divisor lies within a factor 2 below it (an effective batch of 97 gets 49 × 2, not 1 × 97).

torch is imported inside functions only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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
    step, on `samples_per_step` images (== effective_batch when `exact`). For fastai, train with DataLoaders of
    batch size `micro_batch` and, when `accumulation_steps > 1`, `GradientAccumulation(n_acc=n_acc)` — n_acc counts
    samples and is the effective batch, not the number of steps.
    """

    effective_batch: int
    micro_batch: int
    peak_bytes: Optional[int]  # measured at `micro_batch` (None after an OOM restart: not measured)
    budget_bytes: int
    probes: tuple = ()  # ((micro_batch, peak bytes or None for out of memory), ...) in the order tried
    member: str = "member"
    size: Any = None
    oom_restarts: int = 0

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
    def exact(self) -> bool:
        return self.effective_batch % self.micro_batch == 0

    def callbacks(self) -> list:
        """The fastai callbacks this plan needs: GradientAccumulation when more than one micro-batch per step."""
        if self.accumulation_steps == 1:
            return []
        from fastai.callback.training import GradientAccumulation

        return [GradientAccumulation(n_acc=self.n_acc)]

    def as_meta(self) -> dict:
        """For a cache entry's meta.json."""
        return {"effective_batch": self.effective_batch, "micro_batch": self.micro_batch,
                "accumulation_steps": self.accumulation_steps, "n_acc": self.n_acc, "exact": self.exact,
                "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
                "probes": [list(p) for p in self.probes], "oom_restarts": self.oom_restarts}

    def describe(self) -> str:
        if self.accumulation_steps == 1:
            return f"batch {self.micro_batch}"
        extra = "" if self.exact else f" = {self.samples_per_step} samples"
        return f"{self.micro_batch} × {self.accumulation_steps}{extra}"


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
                     size=None) -> MicroBatchPlan:
    """The largest micro-batch ≤ `effective_batch` (among `candidates`) whose probe fits the budget.

    `fits(mb)` runs one probe and returns its peak bytes, or None when it ran out of memory; a peak above
    `budget_bytes` counts as not fitting too (a probe on a larger card than the budget). Memory grows with the
    micro-batch, so: try the effective batch; on failure halve (the largest candidate ≤ half the last one) until
    one fits; then binary-search the candidates strictly between the last fitting and the first failing one.
    Halving first finds a fit in about log2(B) probes starting from the cheap side of the failure (a probe that
    fails is as slow as one that fits, but a fitting one near the answer is what the refinement needs), and the
    refinement adds about log2 of the candidates left between, so a batch of 64 takes at most 7 probes.
    """
    if effective_batch < 1:
        raise ValueError(f"effective batch must be at least 1, got {effective_batch}")
    cands = candidates(effective_batch)
    probes: list[tuple[int, Optional[int]]] = []
    peaks: dict[int, Optional[int]] = {}

    def ok(mb: int) -> bool:
        if mb not in peaks:
            peak = fits(mb)
            peaks[mb] = peak
            probes.append((mb, peak))
        return peaks[mb] is not None and peaks[mb] <= budget_bytes

    # halving: indices into `cands`
    hi = None  # index of the smallest candidate known to fail
    i = len(cands) - 1
    while not ok(cands[i]):
        hi = i
        if i == 0:
            raise MemoryBudgetError(
                f"member {member}: even a micro-batch of 1 at size {_size_text(size) or '?'} does not fit gpu_memory "
                f"{_gib(budget_bytes)} (peak {_gib(peaks[1]) if peaks[1] is not None else 'out of memory'}); raise "
                f"the member's gpu_memory (if the card has more), lower its size or choose a smaller arch")
        limit = cands[i] // 2
        i = max(j for j, c in enumerate(cands) if c <= max(limit, 1))
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
    return MicroBatchPlan(effective_batch, mb, peaks[mb], budget_bytes, tuple(probes), member, size)


def halve_on_oom(plan: MicroBatchPlan) -> MicroBatchPlan:
    """After an out-of-memory error during training: the next candidate at or below half the micro-batch (so
    about twice the accumulation steps), unmeasured. An error when the micro-batch is already 1."""
    if plan.micro_batch <= 1:
        raise MemoryBudgetError(
            f"member {plan.member}: ran out of memory at a micro-batch of 1 at size {_size_text(plan.size) or '?'} "
            f"(gpu_memory {_gib(plan.budget_bytes)}); lower its size, choose a smaller arch or free the GPU "
            "(another process may be using it)")
    smaller = max(c for c in candidates(plan.effective_batch) if c <= max(plan.micro_batch // 2, 1))
    return replace(plan, micro_batch=smaller, peak_bytes=None, oom_restarts=plan.oom_restarts + 1)


# --------------------------------------------------------------------------------------------- the CUDA probe
def probe_size(member) -> tuple[int, int]:
    """(height, width) of the member's largest stage (by area): where memory peaks."""
    sizes = [s if isinstance(s, (tuple, list)) else (s, s) for s, _ in member.stage_plan]
    h, w = max(sizes, key=lambda s: s[0] * s[1])
    return int(h), int(w)


_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def optimizer_state_bytes(model) -> int:
    """What the optimiser will hold that a forward/backward probe does not allocate: fastai's Adam keeps two
    running averages (grad_avg, sqr_avg) per trainable parameter, in the parameters' dtype."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters())


def cuda_probe(model_factory_or_learner, size, budget_bytes: int, precision: str, *, cuda=None,
               device: str = "cuda", limit_memory: bool = True) -> Fits:
    """`fits(micro_batch) -> peak bytes | None` for `plan_micro_batch`: one forward and backward pass (all
    parameters trainable, as in an unfrozen fine-tune) on a random batch of `size` (h, w) under the member's
    autocast `precision`, measured with torch.cuda's peak-memory statistics, plus the optimiser's state
    (`optimizer_state_bytes`). Out of memory returns None (and the cache is emptied).

    `model_factory_or_learner`: a fastai Learner (its `.model`), an nn.Module, or a callable building one (built
    once, on the first probe). Only the parameters' gradients change: training mode, requires_grad flags,
    BatchNorm statistics and the random generators (dropout, the input) are restored after each probe, so
    probing a learner before training leaves its run reproducible.

    `limit_memory`: cap this process at budget/total of the card (`set_per_process_memory_fraction`) so that a
    larger card runs out of memory where the budget would. The cap stays for the training that follows, which is
    then held to the budget it was planned for. `fits.release()` drops the model when planning is done.
    `cuda` (default `torch.cuda`) and `device` are injectable, for tests on CPU.
    """
    import torch

    cuda = torch.cuda if cuda is None else cuda
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
                total = cuda.get_device_properties(0).total_memory
                cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
        return state["model"]

    def step(net, mb: int) -> None:
        """Forward and backward; its tensors die with this frame (or with the OOM exception's traceback)."""
        x = torch.randn(mb, 3, h, w, device=device)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=enabled):
            out = net(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            target = torch.randint(0, out.shape[-1], (mb,), device=device)
            loss = torch.nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        if hasattr(cuda, "synchronize"):
            cuda.synchronize()

    enabled = precision in _DTYPES
    dtype = getattr(torch, _DTYPES.get(precision, "float32"))

    def fits(mb: int) -> Optional[int]:
        net = model()
        was_training = net.training
        flags = [p.requires_grad for p in net.parameters()]
        buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
        rng_devices = [] if torch.device(device).type != "cuda" else [cuda.current_device()]
        try:
            cuda.empty_cache()
            cuda.reset_peak_memory_stats()
            with torch.random.fork_rng(devices=rng_devices):
                for p in net.parameters():
                    p.requires_grad_(True)
                net.train()
                step(net, mb)
            return int(cuda.max_memory_allocated()) + optimizer_state_bytes(net)
        except cuda.OutOfMemoryError:
            return None
        finally:
            net.zero_grad(set_to_none=True)
            for p, f in zip(net.parameters(), flags):
                p.requires_grad_(f)
            net.train(was_training)
            with torch.no_grad():
                for k, v in net.named_buffers():
                    v.copy_(buffers[k])
            cuda.empty_cache()

    def release() -> None:
        """Drop the probe's reference to the model (and the cached blocks): call once the plan is made."""
        state.clear()
        cuda.empty_cache()

    fits.release = release
    return fits


def plan_member(member, model_factory_or_learner, precision: str, *, budget_bytes: int | None = None,
                probe: Callable[..., Fits] = cuda_probe) -> MicroBatchPlan:
    """The micro-batch plan of `member` on CUDA: its `gpu_memory` budget, its largest stage size."""
    from .config import parse_bytes

    budget = parse_bytes(member.gpu_memory) if budget_bytes is None else budget_bytes
    size = probe_size(member)
    fits = probe(model_factory_or_learner, size, budget, precision)
    try:
        return plan_micro_batch(member.batch_size, fits, budget, member=member.name, size=size)
    finally:
        getattr(fits, "release", lambda: None)()
