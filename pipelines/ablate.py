"""`ens ablate`: is each member pulling its weight? Answered from the cached validation probabilities (one fixed
split per competition makes this honest), without a Kaggle submission and without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ensemble
from .config import Project, apply_overrides, read_yaml, write_ensemble
from .errors import EnsError
from .run import Gathered, MemberOutcome, gather_members

MAX_SUBSET_MEMBERS = 12


@dataclass
class MemberRow:
    name: str
    alone: float
    alone_log_loss: float
    alone_changed: tuple  # (changed, now right, now wrong) against the full ensemble
    without: float | None  # None for a one-member ensemble
    without_changed: tuple | None


@dataclass
class Ablation:
    gathered: Gathered
    outcomes: list[MemberOutcome]
    metric: str
    probs: str
    n_valid: int
    full: float
    full_log_loss: float
    members: list[MemberRow]
    subsets: list[tuple] | None  # (indices, score, log loss), best first; None above MAX_SUBSET_MEMBERS
    greedy_counts: np.ndarray
    greedy_score: float
    greedy_log_loss: float
    greedy_rounds: int
    correlation: np.ndarray

    @property
    def damaged(self) -> list:
        return self.gathered.damaged

    @property
    def names(self) -> list[str]:
        return [o.member.name for o in self.outcomes]

    def pick(self, how: str) -> tuple[list[MemberOutcome], list[float]]:
        """The chosen members and weights: greedy selection's counts, or the best subset with its YAML weights."""
        if how == "subset" and self.subsets:
            idx = self.subsets[0][0]
            return [self.outcomes[i] for i in idx], [self.outcomes[i].member.weight for i in idx]
        chosen = [i for i, c in enumerate(self.greedy_counts) if c > 0]
        return [self.outcomes[i] for i in chosen], [float(self.greedy_counts[i]) for i in chosen]


def ablate(project: Project, spec: str, overrides: list[str] = (), cached_only: bool = False, probs: str | None = None,
           rounds: int = 25, progress=None, on_member=lambda o: None) -> Ablation:
    g = gather_members(project, spec, overrides, progress, on_member, cached_only=cached_only)
    if not g.outcomes:
        raise EnsError(f"{project.relative(g.path)}: no member is cached yet; run `ens ablate` without --cached-only "
                       "(or `ens run`) to train them")
    kind = probs or g.ensemble.probs
    metric = g.competition.metric
    outcomes = g.outcomes
    targets = outcomes[0].entry.arrays["valid_targets"]
    p = [o.entry.probs("valid", kind) for o in outcomes]
    weights = [o.member.weight for o in outcomes]
    full = ensemble.combine(p, weights)
    rows = []
    for i, o in enumerate(outcomes):
        rest = [j for j in range(len(p)) if j != i and weights[j] > 0]
        without = ensemble.combine([p[j] for j in rest], [weights[j] for j in rest]) if rest else None
        rows.append(MemberRow(
            o.member.name, ensemble.score(metric, p[i], targets), ensemble.log_loss(p[i], targets),
            ensemble.changed(full, p[i], targets),
            None if without is None else ensemble.score(metric, without, targets),
            None if without is None else ensemble.changed(full, without, targets)))
    subsets = ensemble.subset_scores(p, weights, targets, metric) if len(p) <= MAX_SUBSET_MEMBERS else None
    counts, g_score, g_ll, _ = ensemble.greedy_selection(p, targets, metric, rounds)
    return Ablation(g, outcomes, metric, kind, len(targets), ensemble.score(metric, full, targets),
                    ensemble.log_loss(full, targets), rows, subsets, counts, g_score, g_ll, rounds,
                    ensemble.error_correlation(p, targets))


def write_selection(result: Ablation, overrides: list[str], dest: Path, how: str) -> Path:
    """An ensemble YAML with the chosen members and weights; everything else as in the source (with overrides)."""
    g = result.gathered
    raw = apply_overrides(read_yaml(g.path), list(overrides))
    chosen, weights = result.pick(how)
    by_name = {m.get("name"): m for m in raw["members"]}
    raw["members"] = [dict(by_name[o.member.name], weight=w) for o, w in zip(chosen, weights)]
    score = result.greedy_score if how == "greedy" else result.subsets[0][1]
    header = (f"# written by `ens ablate` from {g.path.name}: {how} selection, validation {result.metric} "
              f"{score:.4f} on {result.n_valid} images ({result.probs} probabilities)\n")
    return write_ensemble(dest, raw, header)
