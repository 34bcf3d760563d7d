"""Fitting one member: seeded DataLoaders, the learner, one learning-rate schedule across progressive-resizing
stages, mixed precision on CUDA. Cross-cutting behaviour lives in fastai callbacks, never in a forked loop."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Member
from ..device import resolve_precision
from ..data import CompetitionData, dataloaders
from ..models import build_learner
from ..util import say, unique_suffix


def device_precision(requested: str) -> tuple[str, str]:
    """(device type, precision) on this machine."""
    import torch

    from ..memory import bf16_native

    cuda = torch.cuda.is_available()
    return ("cuda" if cuda else "cpu"), resolve_precision(requested, cuda, cuda and bf16_native())


def seed_run(member: Member, device: str) -> bool:
    """Seeds Python's, numpy's and torch's generators with the member's seed (fastai's set_seed; the DataLoaders
    draw their own RNG from Python's when they are built) and sets torch's determinism switches for the member's
    `deterministic` on `device` (`memory.set_determinism`: exact on the CPU, cudnn.benchmark on CUDA unless
    `deterministic: true`). Returns whether the run is deterministic."""
    from fastai.torch_core import set_seed

    from ..memory import set_determinism

    set_seed(member.seed)
    return set_determinism(member.deterministic, device)


def _callbacks():
    """The fastai callback classes, defined on first use so that importing this module stays cheap."""
    from fastai.callback.core import Callback

    class ProgressiveResize(Callback):
        """Swaps the Learner's DataLoaders at epoch boundaries, so that stages at different sizes share one
        fit and so one learning-rate schedule (separate fits restart the schedule, and train far worse)."""

        order = -20

        def __init__(self, dls_per_epoch):
            self.dls_per_epoch = dls_per_epoch

        def before_epoch(self):
            self.learn.dls = self.dls_per_epoch[self.epoch]

    class EpochLog(Callback):
        """Keeps each epoch's losses and metrics (for reports and curves), drives a rich progress bar, and
        checkpoints every completed epoch (model, optimizer, RNGs) so that an interrupted run resumes there.
        Epochs before `start_epoch` are being skipped by fastai's SkipToEpoch (a resumed fit): ignored."""

        order = 60  # after the Recorder has computed the epoch's log

        def __init__(self, phase, rows, start_epoch, save, progress=None, task=None, size_of=None):
            self.phase, self.rows, self.start_epoch, self.save = phase, rows, start_epoch, save
            self.progress, self.task, self.size_of = progress, task, size_of

        def before_epoch(self):
            if self.progress is not None and self.epoch >= self.start_epoch:
                self.progress.reset(self.task, total=len(self.dls.train), completed=0,
                                    description=f"  {self.phase} epoch {self.epoch + 1}/{self.n_epoch}")

        def after_batch(self):
            if self.progress is not None and self.training:
                self.progress.advance(self.task)

        def after_epoch(self):
            if self.epoch < self.start_epoch:
                return
            names = self.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
            row = {"phase": self.phase, "epoch": self.epoch, **{n: _float(v) for n, v in zip(names, self.recorder.log[1:-1])}}
            row["size"] = self.size_of(self.epoch) if self.size_of else None
            self.rows.append(row)
            self.save(self.phase, self.epoch + 1)

    class ZeroGradients(Callback):
        """Every fit starts without gradients. fastai zeroes them after each optimiser step only, and its
        GradientAccumulation resets its sample count in before_fit but leaves the gradients of the micro-batches
        after the last step (a phase's last epoch rarely ends on a step) to join the next fit's first step."""

        def before_fit(self):
            self.learn.model.zero_grad(set_to_none=True)

    class FirstStep(Callback):
        """Calls `note` once, when the first training step has run: the end of a member's start-up."""

        def __init__(self, note):
            self.note = note

        def after_batch(self):
            if self.training and self.note is not None:
                self.note()
                self.note = None

    return ProgressiveResize, EpochLog, ZeroGradients, FirstStep


# For tests that interrupt training at a named point rather than after a guessed sleep (which misses a window of
# one epoch on a loaded machine): "SIGINT after train epoch 2" (or "... #2": the second time this process reaches
# that point: the second member or fold). The signal comes at the first batch after that epoch's checkpoint.
KILL_AT = "ENS_TEST_KILL_AT"
_kill_state: dict = {"seen": 0, "armed": False}  # per process: members and folds trained one after another


# Tests of a notebook's time limit must not depend on how fast this machine trains: "10" (each epoch lasts 10 s
# more: a slow card's epochs, on any CPU) or "900 after train epoch 2" (once, after that epoch's checkpoint, in the
# process that trained it: a resumed run, past it, does not sleep).
EPOCH_SLEEP = "ENS_TEST_EPOCH_SLEEP"


def _epoch_sleep_callbacks(phase: str, start_epoch: int) -> list:
    """[the callback `ENS_TEST_EPOCH_SLEEP` asks for] when the variable is set, else []."""
    import re

    spec = os.environ.get(EPOCH_SLEEP)
    if not spec:
        return []
    from fastai.callback.core import Callback

    from ..errors import EnsError

    m = re.fullmatch(r"(\d+(?:\.\d*)?)(?: after (\w+) epoch (\d+))?", spec.strip())
    if m is None:
        raise EnsError(f"{EPOCH_SLEEP}={spec!r}: write it as '10' or '900 after train epoch 2'")
    seconds, point = float(m[1]), (m[2], int(m[3])) if m[2] else None

    class EpochSleep(Callback):
        order = 61  # after EpochLog has saved the epoch's checkpoint

        def after_epoch(self):  # fastai calls it for the epochs a resumed fit skips, too
            if self.epoch >= start_epoch and (point is None or (phase, self.epoch + 1) == point):
                time.sleep(seconds)

    return [EpochSleep()]


def _kill_at_callback():
    """The callback class `ENS_TEST_KILL_AT` asks for (built with the phase's name and first epoch), or None."""
    import re
    import signal

    from fastai.callback.core import Callback

    from ..errors import EnsError

    spec = os.environ.get(KILL_AT)
    if not spec:
        return None
    m = re.fullmatch(r"(SIG[A-Z]+) after (\w+) epoch (\d+)(?: #(\d+))?", spec.strip())
    if m is None or not isinstance(getattr(signal, m[1], None), signal.Signals):
        raise EnsError(f"{KILL_AT}={spec!r}: write it as 'SIGINT after train epoch 2' (optionally ' #2': the nth time)")
    sig, point, nth = getattr(signal, m[1]), (m[2], int(m[3])), int(m[4] or 1)

    class KillAt(Callback):
        order = 61  # after EpochLog has saved the epoch's checkpoint

        def __init__(self, phase, start_epoch):
            self.phase, self.start_epoch = phase, start_epoch

        def after_epoch(self):
            if self.epoch >= self.start_epoch and (self.phase, self.epoch + 1) == point:
                _kill_state["seen"] += 1
                _kill_state["armed"] = _kill_state["seen"] == nth

        def after_batch(self):
            if _kill_state["armed"] and self.training:  # mid-epoch (the next phase's, too), as Ctrl-C would come
                _kill_state["armed"] = False
                os.kill(os.getpid(), sig)

    return KillAt


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class Trained:
    learn: object
    history: list = field(default_factory=list)
    precision: str = "fp32"
    device: str = "cpu"
    seconds: float = 0.0
    resumed_at: str | None = None  # where an interrupted run was picked up
    memory: dict | None = None  # on CUDA: micro-batch, accumulation, peak memory, OOM restarts
    normalize: tuple | None = None  # the (mean, std) inputs were normalised with: needed to reuse kept weights
    deterministic: bool = True  # bit-exact (`seed_run`): always on the CPU, on CUDA with `deterministic: true`
    # seconds of each step before the first training step: memory_probe_s, loaders_s (decoded copy included),
    # model_s (network and weights), first_step_s (the first batch, forward and backward)
    startup: dict = field(default_factory=dict)


def _rng_state(stage_dls: dict) -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "dls": {k: (d.train.rng.getstate(), d.valid.rng.getstate()) for k, d in stage_dls.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the batch augmentation draws on the GPU there
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, stage_dls: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for k, (train, valid) in state["dls"].items():
        stage_dls[k].train.rng.setstate(train)
        stage_dls[k].valid.rng.setstate(valid)


def load_checkpoint(folder: Path | None) -> dict | None:
    """The last completed epoch of an interrupted run, or None (a damaged file counts as none)."""
    import torch

    path = folder / CHECKPOINT if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a file cut short by a crash: start over rather than fail
        return None


CHECKPOINT = "checkpoint.pth"


@dataclass
class Phase:
    name: str  # 'frozen' or 'train'
    epochs: int
    fit_args: dict
    cbs: list
    size_of: object  # epoch -> size, for the history


def _phases(member: Member, resize, size_per_epoch: list, first_size) -> list[Phase]:
    """One fit_one_cycle for a body trained from scratch; for a pretrained one, fastai's `fine_tune` spelled out
    (so that each phase can resume): `freeze_epochs` frozen epochs at `slice(lr)`, then every stage unfrozen at
    `slice(lr/200, lr/2)`, pct_start 0.3, div 5 — the unfrozen fit for any `freeze_epochs`, 0 included.
    Progressive resizing joins the unfrozen fit only."""
    train_sizes = size_per_epoch.__getitem__
    if not member.pretrained:
        return [Phase("train", member.total_epochs, dict(lr_max=member.lr), [resize], train_sizes)]
    base = member.lr / 2
    phases = [Phase("frozen", member.freeze_epochs, dict(lr_max=slice(member.lr), pct_start=0.99), [],
                    lambda e: first_size)] if member.freeze_epochs else []
    return phases + [Phase("train", member.total_epochs, dict(lr_max=slice(base / 100, base), pct_start=0.3, div=5.0),
                           [resize], train_sizes)]


def _resume_point(ckpt: dict | None, phases: list[Phase]) -> tuple[int, int]:
    """(index of the phase to run first, its first epoch) after checkpoint `ckpt`; (len(phases), 0) when every
    phase had finished (the checkpoint's weights are then the trained ones)."""
    if not ckpt:
        return 0, 0
    names = [p.name for p in phases]
    index = names.index(ckpt["phase"])
    if ckpt["epochs_done"] >= phases[index].epochs:
        return index + 1, 0
    return index, ckpt["epochs_done"]


def _restore(learn, ckpt: dict, stage_dls: dict, with_optimizer: bool, average=None) -> None:
    """The learner's weights (and optimizer moments, mid-phase), the weights' average (`average`: EMA or the last
    epochs') and every random generator as they were at the checkpoint."""
    if learn.opt is None:
        learn.create_opt()
    learn.model.load_state_dict(ckpt["model"])
    if with_optimizer:
        learn.opt.load_state_dict(ckpt["opt"])
    _set_rng_state(ckpt["rng"], stage_dls)
    if average is not None and "average" in ckpt:
        average.load(ckpt["average"])


def memory_plan(member: Member, data: CompetitionData, device: str, precision: str):
    """On CUDA, the largest micro-batch that fits the member's `gpu_memory` budget (probed with real training
    steps, `memory.cuda_probe`) and the gradient accumulation that keeps its effective batch; None on the CPU."""
    if device != "cuda":
        return None
    from ..accel import channels_last_model
    from ..memory import plan_member
    from ..models import build_model

    # probed in the memory layout training will use (`accel.accelerate`)
    build = lambda: channels_last_model(build_model(member.arch, len(data.vocab), member.final_size), device, precision)  # noqa: E731
    return plan_member(member, build, precision)


def train_member(member: Member, data: CompetitionData, progress=None, checkpoint_dir: Path | None = None,
                 cbs=()) -> Trained:
    """Train `member` on the competition's fixed split and return its Learner (DataLoaders at the final size).

    With `checkpoint_dir`, every completed epoch is saved there (model, optimizer, RNG states, history), and a
    checkpoint found there is resumed from: the fit restarts at the next epoch with the learning-rate schedule
    where it was (fastai's `start_epoch`), reaching what an uninterrupted run reaches. On CUDA the batch is
    split into micro-batches that fit the memory budget; an out-of-memory error restarts from the last completed
    epoch with half the micro-batch (and twice the accumulation), once the failed learner is freed (cuBLAS and
    cuDNN allocation failures count as out of memory: `memory.retry_on_oom`). `cbs` join every fit. The result's
    `deterministic` says whether the run was bit-exact (`seed_run`). On CUDA the process is held to the member's
    budget while it plans and trains (`memory.memory_cap`), and its previous cap is back afterwards."""
    from contextlib import nullcontext

    from ..config import parse_bytes
    from ..memory import memory_cap, retry_on_oom, set_determinism

    device, precision = device_precision(member.precision)
    # before the probe too: cudnn.benchmark picks other convolution algorithms, with other workspaces
    deterministic = set_determinism(member.deterministic, device)

    def restarted(smaller, reason: str) -> None:
        say(progress)(f"[yellow]out of memory[/]: {member.name} restarts from its last completed epoch with micro-batch "
            f"{smaller.describe()}")

    with memory_cap(parse_bytes(member.gpu_memory)) if device == "cuda" else nullcontext():
        probing = time.perf_counter()
        plan = memory_plan(member, data, device, precision)
        probed = time.perf_counter() - probing
        # `_fit` is looked up when called (tests put a stub there); the lambda holds no learner between attempts
        trained = retry_on_oom(lambda p: _fit(member, data, progress, checkpoint_dir, cbs, device, precision, p),
                               plan, restarted)
    trained.deterministic = deterministic
    trained.startup = {"memory_probe_s": round(probed, 3), **(trained.startup or {})}
    return trained


def _fit(member, data, progress, checkpoint_dir, cbs, device, precision, plan) -> Trained:
    import torch
    from fastai.callback.progress import ProgressCallback
    from fastai.callback.core import CancelFitException
    from fastai.vision.all import Normalize, accuracy, noop

    from ..accel import accelerate, loader_options
    from ..cache import torch_save
    from ..errors import disk_full, disk_full_error

    start = time.perf_counter()
    seed_run(member, device)  # also seeds the DataLoaders' own RNG, drawn when they are built
    sizes = []
    for size, _ in member.stage_plan:
        if size not in sizes:
            sizes.append(size)
    loader_member = member if plan is None else member.model_copy(update={"batch_size": plan.micro_batch})
    stage_dls = {str(s): dataloaders(data, loader_member, s) for s in sizes}
    startup = {"loaders_s": round(time.perf_counter() - start, 3)}
    first = stage_dls[str(sizes[0])]
    learn, stats = build_learner(first, member, metrics=[accuracy])
    startup["model_s"] = round(time.perf_counter() - start - startup["loaders_s"], 3)
    from .on_device import OnDeviceRecords
    from .recipe import EMAWeights, LastEpochsAverage, loss_func, mix_callbacks

    if loss_func(member) is not None:
        learn.loss_func = loss_func(member)
    if data.soft_targets is not None:  # distillation (`data.with_soft_targets`)
        from .recipe import distill_loss

        learn.loss_func = distill_loss(member, learn.loss_func)
    for dls in stage_dls.values():  # the statistics are known only once the model (and its weights) is
        dls.add_tfms([Normalize.from_stats(*stats)], "after_batch")
    learn.remove_cb(ProgressCallback)
    learn.add_cb(OnDeviceRecords())  # no host-device sync per step: losses and metrics read once per epoch
    learn.logger = noop  # the Recorder would print every epoch
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    for note in accelerate(learn, member, device, precision=precision) + loader_options(member, device)[1]:
        say(progress)(f"{member.name}: {note}")
    # the average of the weights in the layout and on the device training uses (`accelerate` may change both)
    average = (EMAWeights(learn.model, member.ema.decay, member.ema.warmup) if member.ema else
               LastEpochsAverage(member.average.epochs) if member.average else None)
    recipe = mix_callbacks(member) + ([average] if average else [])

    ProgressiveResize, EpochLog, ZeroGradients, FirstStep = _callbacks()
    KillAt = _kill_at_callback()
    size_per_epoch = [s for s, e in member.stage_plan for _ in range(e)]
    resize = ProgressiveResize([stage_dls[str(s)] for s in size_per_epoch])
    phases = _phases(member, resize, size_per_epoch, sizes[0])
    failure: list = []  # an error met inside a callback, raised once fastai has wound the fit down

    def save(phase: str, epochs_done: int) -> None:
        if checkpoint_dir is None:
            return
        if member.keep_model and (phase, epochs_done) == (phases[-1].name, phases[-1].epochs):
            return  # the trained weights: kept at once by the caller (`run`), the model alone; an interruption
            # before they are kept redoes the last epoch, from the checkpoint before it
        tmp = checkpoint_dir / f"{CHECKPOINT}{unique_suffix()}"
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            torch_save({"phase": phase, "epochs_done": epochs_done, "model": learn.model.state_dict(),
                        "opt": learn.opt.state_dict(), "rng": _rng_state(stage_dls), "history": history,
                        **({"average": average.state()} if average else {})}, tmp)
            os.replace(tmp, checkpoint_dir / CHECKPOINT)  # a kill mid-write leaves the previous epoch's checkpoint
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if not (isinstance(e, OSError) and disk_full(e)):
                raise
            failure.append(disk_full_error(checkpoint_dir, f"the checkpoint of {member.name}"))
            raise CancelFitException() from None  # fastai would rewrite an error raised in a callback

    built = start + startup["loaders_s"] + startup["model_s"]  # the first step's time includes accelerate's
    first_step = FirstStep(lambda: startup.update(first_step_s=round(time.perf_counter() - built, 3)))
    ckpt = load_checkpoint(checkpoint_dir)
    history: list = list(ckpt["history"]) if ckpt else []
    resume_phase, start_epoch = _resume_point(ckpt, phases)
    resumed_at = None
    if ckpt:
        resumed_at = (f"{phases[resume_phase].name} epoch {start_epoch + 1} of {phases[resume_phase].epochs}"
                      if resume_phase < len(phases) else "after its last epoch")
        say(progress)(f"{member.name} ({member.arch}): resuming an interrupted run at {resumed_at}")
    task = progress.add_task("  epoch", total=None) if progress is not None else None
    from .progress import MemberClock, epoch_line_callback

    epoch_sizes = [phase.size_of(e) for phase in phases for e in range(phase.epochs)]
    first = sum(p.epochs for p in phases[:resume_phase]) + start_epoch
    clock = MemberClock(epoch_sizes, sum(not v for v in data.is_valid), first)
    try:  # the epoch bar goes when the fit ends, however it ends
        for index, phase in enumerate(phases[resume_phase:], start=resume_phase):
            begin = start_epoch if index == resume_phase else 0
            if member.pretrained:  # vision_learner froze the pretrained body: fine_tune freezes, then unfreezes
                learn.freeze() if phase.name == "frozen" else learn.unfreeze()  # noqa: B018 (an expression as a statement)
            if ckpt and index == resume_phase:
                _restore(learn, ckpt, stage_dls, with_optimizer=begin > 0, average=average)  # a new phase starts its moments afresh,
                # as fastai's own unfreeze does (it clears the optimizer's state)
            if begin and phase.name == "train":
                learn.dls = resize.dls_per_epoch[begin]
            log = EpochLog(phase.name, history, begin, save, progress, task, phase.size_of)
            kill = ([KillAt(phase.name, begin)] if KillAt else []) + _epoch_sleep_callbacks(phase.name, begin)
            if isinstance(average, LastEpochsAverage):  # the last epochs of the last fit
                average.active = index == len(phases) - 1
            accumulate = plan.callbacks() if plan is not None else []
            line = epoch_line_callback(member, clock, sum(p.epochs for p in phases[:index]), progress)
            fit_cbs = [ZeroGradients(), *phase.cbs, *accumulate, *recipe, *cbs, log, line, *kill, first_step]
            learn.fit_one_cycle(phase.epochs, **phase.fit_args, cbs=fit_cbs, start_epoch=begin)
            if failure:
                raise failure[0]
    finally:
        if task is not None:
            progress.remove_task(task)
    if ckpt and resume_phase == len(phases):  # every epoch was done before the interruption: its weights are the result
        _restore(learn, ckpt, stage_dls, with_optimizer=False, average=average)
    if average is not None:  # the member is the average: TTA, the cache and the kept weights use it
        average.apply(learn.model)
    learn.dls = stage_dls[str(member.final_size)]
    memory = plan.as_meta() if plan is not None else None
    normalize = tuple([float(x) for x in v] for v in stats)
    return Trained(learn, history, precision, device, time.perf_counter() - start, resumed_at, memory, normalize,
                   startup=startup)
