"""Fitting one member: seeded DataLoaders, the learner, one learning-rate schedule across progressive-resizing
stages, mixed precision on CUDA. Cross-cutting behaviour lives in fastai callbacks, never in a forked loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
        """Keeps each epoch's losses and metrics (for reports and curves) and drives a rich progress bar."""

        order = 60  # after the Recorder has computed the epoch's log

        def __init__(self, phase, rows, progress=None, task=None, size_of=None):
            self.phase, self.rows, self.progress, self.task, self.size_of = phase, rows, progress, task, size_of

        def before_epoch(self):
            if self.progress is not None:
                self.progress.reset(self.task, total=len(self.dls.train), completed=0,
                                    description=f"  {self.phase} epoch {self.epoch + 1}/{self.n_epoch}")

        def after_batch(self):
            if self.progress is not None and self.training:
                self.progress.advance(self.task)

        def after_epoch(self):
            names = self.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
            row = {"phase": self.phase, "epoch": self.epoch, **{n: _float(v) for n, v in zip(names, self.recorder.log[1:-1])}}
            row["size"] = self.size_of(self.epoch) if self.size_of else None
            self.rows.append(row)

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


def train_member(member: Member, data: CompetitionData, progress=None) -> Trained:
    """Train `member` on the competition's fixed split and return its Learner (DataLoaders at the final size)."""
    from fastai.callback.progress import ProgressCallback
    from fastai.vision.all import Normalize, accuracy, noop, set_seed

    start = time.perf_counter()
    device, precision = device_precision(member.precision)
    set_seed(member.seed, reproducible=True)  # also seeds the DataLoaders' own RNG, drawn when they are built
    sizes = []
    for size, _ in member.stage_plan:
        if size not in sizes:
            sizes.append(size)
    stage_dls = {str(s): dataloaders(data, member, s) for s in sizes}
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
    history: list = []
    task = progress.add_task("  epoch", total=None) if progress is not None else None
    log = lambda phase, size_of: EpochLog(phase, history, progress, task, size_of)  # noqa: E731
    if member.pretrained and member.freeze_epochs:
        # fastai's fine_tune, spelled out so that progressive resizing joins only the unfrozen fit
        learn.freeze()
        learn.fit_one_cycle(member.freeze_epochs, slice(member.lr), pct_start=0.99,
                            cbs=[log("frozen", lambda e: sizes[0])])
        learn.unfreeze()
        base = member.lr / 2
        learn.fit_one_cycle(member.total_epochs, slice(base / 100, base), pct_start=0.3, div=5.0,
                            cbs=[resize, log("train", size_per_epoch.__getitem__)])
    else:
        learn.fit_one_cycle(member.total_epochs, member.lr, cbs=[resize, log("train", size_per_epoch.__getitem__)])
    if task is not None:
        progress.remove_task(task)
    learn.dls = stage_dls[str(member.final_size)]
    return Trained(learn, history, precision, device, time.perf_counter() - start)
