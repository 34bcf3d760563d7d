"""Numbers for long work: each epoch's line (loss, metric, time, ETA of the member and of the run) and who else
hears of each epoch (MLflow tracking). The driver (`run.gather_members`) sets the run's clock and the watchers
for the work it does in this process; training (`train/progress.py`) reads them. Imports nothing of ens."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

RUN_CLOCK: ContextVar["RunClock | None"] = ContextVar("ens_run_clock", default=None)
EPOCH_WATCHERS: ContextVar[tuple] = ContextVar("ens_epoch_watchers", default=())  # each called with an epoch's dict


def pixels(size) -> int:
    return int(size) ** 2 if isinstance(size, int) else int(size[0]) * int(size[1])


def unit_work(member, n_train: int) -> float:
    """A model's training work in image·pixels over its epochs (the frozen ones at the first size): the unit in
    which one model's measured speed predicts another's."""
    frozen = member.freeze_epochs if member.pretrained else 0
    stages = list(member.stage_plan)
    return n_train * (frozen * pixels(stages[0][0]) + sum(e * pixels(s) for s, e in stages))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


@dataclass
class RunClock:
    """The run's models still to compute, as (arch, work), and the speed measured so far per arch (seconds per
    image·pixel); an arch not measured yet is taken at the mean speed of those that are (so the run's ETA is
    marked `~`)."""

    left: list = field(default_factory=list)
    rates: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)  # member, fold, label of the model being trained

    def start(self, arch: str, work: float, **current) -> None:
        if (arch, work) in self.left:
            self.left.remove((arch, work))
        self.current = current

    def measured(self, arch: str, seconds_per_work: float) -> None:
        self.rates[arch] = seconds_per_work

    def eta(self, member_left: float) -> float | None:
        if not self.rates:
            return None
        mean = sum(self.rates.values()) / len(self.rates)
        return member_left + sum(work * self.rates.get(arch, mean) for arch, work in self.left)
