"""A line per epoch (member, epoch k/n, train loss, valid metric, the epoch's time, ETA of the member and of the
run), as a fastai callback: above the bars on a terminal, plain flushed lines in a log; and the epoch handed to
the watchers (`clock.EPOCH_WATCHERS`: MLflow)."""

from __future__ import annotations

import time

from ..clock import EPOCH_WATCHERS, RUN_CLOCK, duration, pixels
from ..util import say


class MemberClock:
    """One model's epochs across its fits (phases): the work of each (pixels of its size) and the time of those
    run in this process, for its ETA."""

    def __init__(self, epoch_sizes: list, n_train: int, first: int):
        self.work = [pixels(s) * n_train for s in epoch_sizes]
        self.first, self.seconds, self.done_work = first, 0.0, 0.0  # epochs before `first` were resumed

    def record(self, index: int, seconds: float) -> tuple[float, float]:
        """(seconds per image·pixel so far, seconds left) once epoch `index` (over all phases) took `seconds`."""
        self.seconds += seconds
        self.done_work += self.work[index]
        rate = self.seconds / max(self.done_work, 1.0)
        return rate, rate * sum(self.work[index + 1:])


def epoch_line_callback(member, clock: MemberClock, offset: int, progress):
    """The fastai callback of one fit (phase) whose first epoch is epoch `offset` of the member."""
    from fastai.callback.core import Callback

    class EpochLine(Callback):
        order = 61  # after the Recorder (and EpochLog) have the epoch's numbers

        def before_epoch(self):
            self.started = time.perf_counter()

        def after_epoch(self):
            index = offset + self.epoch
            if index < clock.first:  # skipped by a resumed fit
                return
            seconds = time.perf_counter() - self.started
            rate, left = clock.record(index, seconds)
            run = RUN_CLOCK.get()
            names = self.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
            values = {n: _float(v) for n, v in zip(names, self.recorder.log[1:-1])}
            label = (run.current.get("label") if run and run.current else None) or f"{member.name} ({member.arch})"
            total = len(clock.work)
            scores = " · ".join(f"{n.replace('_', ' ')} {v:.4f}" for n, v in values.items() if v is not None)
            eta = f"ETA member {duration(left)}"
            if run is not None:
                run.measured(member.arch, rate)
                eta += f", run ~{duration(run.eta(left))}"
            say(progress)(f"{label}: epoch {index + 1}/{total} · {scores} · {seconds:.1f}s · {eta}")
            for watch in EPOCH_WATCHERS.get():
                watch({"member": member.name, "fold": run.current.get("fold") if run and run.current else None,
                       "epoch": index + 1, "epochs": total, "seconds": seconds, **values})

    return EpochLine()


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
