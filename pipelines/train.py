"""Fitting one member: seeded DataLoaders, the learner, one learning-rate schedule across progressive-resizing
stages, mixed precision on CUDA. Cross-cutting behaviour lives in fastai callbacks, never in a forked loop."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Member
from .data import CompetitionData, dataloaders
from .models import build_learner


def resolve_precision(requested: str, cuda: bool, bf16_supported: bool) -> str:
    """'fp32' on CPU whatever was asked (CPU autocast to half is slower and less exact); on CUDA 'auto' is bf16
    where the card supports it (no loss scaling needed), else fp16."""
    if not cuda:
        return "fp32"
    if requested in ("auto", "bf16"):  # bf16 asked of a card without it: fp16 is the fast path left
        return "bf16" if bf16_supported else "fp16"
    return requested


def device_precision(requested: str) -> tuple[str, str]:
    """(device type, precision) on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    return ("cuda" if cuda else "cpu"), resolve_precision(requested, cuda, cuda and torch.cuda.is_bf16_supported())


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

    return ProgressiveResize, EpochLog


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


def _rng_state(stage_dls: dict) -> dict:
    import random

    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "dls": {k: (d.train.rng.getstate(), d.valid.rng.getstate()) for k, d in stage_dls.items()}}


def _set_rng_state(state: dict, stage_dls: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
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


def memory_plan(member: Member, data: CompetitionData, device: str, precision: str):
    """On CUDA, the largest micro-batch that fits the member's `gpu_memory` budget (probed with a real forward
    and backward pass) and the gradient accumulation that keeps its effective batch; None on the CPU."""
    if device != "cuda":
        return None
    from .memory import plan_member
    from .models import build_model

    return plan_member(member, lambda: build_model(member.arch, len(data.vocab), member.final_size), precision)


def train_member(member: Member, data: CompetitionData, progress=None, checkpoint_dir: Path | None = None,
                 cbs=()) -> Trained:
    """Train `member` on the competition's fixed split and return its Learner (DataLoaders at the final size).

    With `checkpoint_dir`, every completed epoch is saved there (model, optimizer, RNG states, history), and a
    checkpoint found there is resumed from: the fit restarts at the next epoch with the learning-rate schedule
    where it was (fastai's `start_epoch`), reaching what an uninterrupted run reaches. On CUDA the batch is
    split into micro-batches that fit the memory budget; an out-of-memory error restarts from the last completed
    epoch with half the micro-batch (and twice the accumulation). `cbs` join every fit."""
    import torch

    from .memory import halve_on_oom

    device, precision = device_precision(member.precision)
    plan = memory_plan(member, data, device, precision)
    say = progress.console.print if progress is not None else (lambda text: print(text, file=sys.stderr))
    while True:
        try:
            return _fit(member, data, progress, checkpoint_dir, cbs, device, precision, plan)
        except torch.cuda.OutOfMemoryError:
            if plan is None:
                raise
            torch.cuda.empty_cache()
            plan = halve_on_oom(plan)  # raises when the micro-batch is already 1
            say(f"[yellow]out of memory[/]: {member.name} restarts from its last completed epoch with micro-batch "
                f"{plan.describe()}")


def _fit(member, data, progress, checkpoint_dir, cbs, device, precision, plan) -> Trained:
    import torch
    from fastai.callback.progress import ProgressCallback
    from fastai.vision.all import Normalize, accuracy, noop, set_seed

    start = time.perf_counter()
    set_seed(member.seed, reproducible=True)  # also seeds the DataLoaders' own RNG, drawn when they are built
    sizes = []
    for size, _ in member.stage_plan:
        if size not in sizes:
            sizes.append(size)
    loader_member = member if plan is None else member.model_copy(update={"batch_size": plan.micro_batch})
    stage_dls = {str(s): dataloaders(data, loader_member, s) for s in sizes}
    first = stage_dls[str(sizes[0])]
    learn, stats = build_learner(first, member, metrics=[accuracy])
    for dls in stage_dls.values():  # the statistics are known only once the model (and its weights) is
        dls.add_tfms([Normalize.from_stats(*stats)], "after_batch")
    learn.remove_cb(ProgressCallback)
    learn.logger = noop  # the Recorder would print every epoch
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()

    ProgressiveResize, EpochLog = _callbacks()
    size_per_epoch = [s for s, e in member.stage_plan for _ in range(e)]
    resize = ProgressiveResize([stage_dls[str(s)] for s in size_per_epoch])
    base = member.lr / 2
    # fastai's fine_tune, spelled out: progressive resizing joins only the unfrozen fit, and each phase resumes
    phases = [("train", member.total_epochs, dict(lr_max=member.lr), [resize], size_per_epoch.__getitem__)]
    if member.pretrained and member.freeze_epochs:
        phases = [("frozen", member.freeze_epochs, dict(lr_max=slice(member.lr), pct_start=0.99), [], lambda e: sizes[0]),
                  ("train", member.total_epochs, dict(lr_max=slice(base / 100, base), pct_start=0.3, div=5.0),
                   [resize], size_per_epoch.__getitem__)]
    names = [p[0] for p in phases]

    def save(phase: str, epochs_done: int) -> None:
        if checkpoint_dir is None:
            return
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint_dir / f"{CHECKPOINT}.tmp{os.getpid()}"
        torch.save({"phase": phase, "epochs_done": epochs_done, "model": learn.model.state_dict(),
                    "opt": learn.opt.state_dict(), "rng": _rng_state(stage_dls), "history": history}, tmp)
        os.replace(tmp, checkpoint_dir / CHECKPOINT)  # a kill mid-write leaves the previous epoch's checkpoint

    ckpt = load_checkpoint(checkpoint_dir)
    history: list = list(ckpt["history"]) if ckpt else []
    resumed_at = None
    task = progress.add_task("  epoch", total=None) if progress is not None else None
    for index, (phase, n_epochs, fit_args, extra_cbs, size_of) in enumerate(phases):
        start_epoch = 0
        if ckpt:
            done_index = names.index(ckpt["phase"])
            if index < done_index or (index == done_index and ckpt["epochs_done"] >= n_epochs):
                continue  # this phase finished before the interruption
            if index == done_index:
                start_epoch = ckpt["epochs_done"]
        if len(phases) > 1:
            learn.freeze() if phase == "frozen" else learn.unfreeze()  # noqa: B018 (an expression as a statement)
        if ckpt and resumed_at is None:
            learn.create_opt()
            learn.model.load_state_dict(ckpt["model"])
            if start_epoch:  # mid-phase: the optimizer's moments too (a new phase starts them afresh)
                learn.opt.load_state_dict(ckpt["opt"])
            _set_rng_state(ckpt["rng"], stage_dls)
            resumed_at = f"{phase} epoch {start_epoch}"
        if start_epoch and phase == "train":
            learn.dls = resize.dls_per_epoch[start_epoch]
        log = EpochLog(phase, history, start_epoch, save, progress, task, size_of)
        accumulate = plan.callbacks() if plan is not None else []
        learn.fit_one_cycle(n_epochs, **fit_args, cbs=[*extra_cbs, *accumulate, *cbs, log], start_epoch=start_epoch)
    if task is not None:
        progress.remove_task(task)
    learn.dls = stage_dls[str(member.final_size)]
    memory = plan.as_meta() if plan is not None else None
    normalize = tuple([float(x) for x in v] for v in stats)
    return Trained(learn, history, precision, device, time.perf_counter() - start, resumed_at, memory, normalize)
