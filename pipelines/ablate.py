"""`ens ablate`: is each member pulling its weight? Answered from the cached validation probabilities — the
out-of-fold ones of every training image in a cross-validated ensemble, the fixed holdout's otherwise — without a
Kaggle submission and without importing torch. Each difference comes with a paired bootstrap interval and
McNemar's p-value over the images (signal, or one lucky image?), every `combine:` method is scored side by side
(learned ones by nested cross-validation), and a cross-validated member's folds show their spread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ensemble
from .config import COMBINE_METHODS, MAX_SUBSET_MEMBERS, Combine, Project, apply_overrides, read_yaml, write_ensemble
from .errors import EnsError
from .util import write_json
from .run import Gathered, MemberOutcome, gather_members



@dataclass
class MemberRow:
    name: str
    alone: float
    alone_log_loss: float
    alone_changed: tuple  # (changed, now right, now wrong) against the full ensemble
    without: float | None  # None for a one-member ensemble
    without_changed: tuple | None
    alone_interval: tuple  # (Δ against the full ensemble, low, high): paired bootstrap 95% interval over images
    # (over whole groups when the competition has cv.group_column): an `ensemble.Interval`
    alone_p: float  # McNemar's p-value of the predicted labels' hits, against the full ensemble (clustered by group)
    without_interval: tuple | None
    without_p: float | None
    folds: list[float] | None = None  # cv: the member's score on each fold (its fold models)


@dataclass
class MethodRow:
    """One `combine:` method on these members: its score on the validation rows (in-sample: optimistic for a
    learned blend) and the honest one (nested cross-validation for a learned blend, the same for a fixed one)."""

    method: str
    learned: bool
    in_sample: float
    honest: float
    per_fold: list[float]
    log_loss: float


@dataclass
class ViewRow:
    """One TTA view of a member (`TTA.views`): its score alone, and the member's TTA score without it."""

    member: str
    view: str  # a named view, or 'plain + passes' (the beta blend the views are averaged with)
    alone: float
    without: float | None  # None for the blend itself
    tta: float  # the member's TTA score with every view


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
    greedy_honest: float  # greedy selection's nested-CV score: its counts are learned on these rows
    subset_honest: float | None  # the best subset's, picked on the training part of each nested-CV split
    correlation: np.ndarray
    methods: list[MethodRow]
    scored_on: str  # 'out-of-fold' (cv) or 'holdout'
    n_folds: int  # the folds learned blends are scored over by nested cross-validation
    views: list[ViewRow]  # members with TTA views: which views help
    n_groups: int | None = None  # cv.group_column: the bootstrap draws whole groups, McNemar is clustered
    subset_per_fold: list[float] | None = None  # the best subset's nested-CV score on each part

    @property
    def damaged(self) -> list:
        return self.gathered.damaged

    @property
    def names(self) -> list[str]:
        return [o.member.name for o in self.outcomes]

    def pick(self, how: str) -> tuple[list[MemberOutcome], list[float]]:
        """The chosen members and weights: the best subset with its YAML weights, or (greedy, a `combine:`
        method) every member with its YAML weight."""
        if how == "subset" and not self.subsets:
            raise EnsError(f"--pick subset: {len(self.outcomes)} members are more than the "
                           f"{MAX_SUBSET_MEMBERS} whose subsets are scored; pick greedy or a combine method")
        # a subset is written as `combine: subset` over every member: chosen again on the rows wherever it is run,
        # and scored by nested CV there too (its members alone as a plain mean would call the pick's score honest)
        return list(self.outcomes), [o.member.weight for o in self.outcomes]

    def combine(self, how: str) -> Combine:
        """The blend a pick is submitted with: the method picked; greedy as `combine: greedy` with these rounds
        (learned on the rows, so scored by nested CV wherever it is run: counts written out as a plain mean would
        call their in-sample score honest); a subset as the weighted mean of its members."""
        own = self.gathered.ensemble.combine
        if how == "greedy":
            return own if own.method == "greedy" and own.rounds == self.greedy_rounds else \
                Combine(method="greedy", rounds=self.greedy_rounds)
        if _method(how):
            return own if how == own.method else Combine(method=how)
        return Combine()

    def score_of(self, how: str) -> float:
        """The pick's honest score on these rows: nested cross-validation of whatever was learned or picked on
        them (the subset included: the best of 2^m subsets flatters itself as a learned weight does)."""
        if _method(how):
            return next(m.honest for m in self.methods if m.method == how)
        return self.greedy_honest if how == "greedy" else self.subset_honest


def _method(how: str) -> bool:
    """A pick that names a `combine:` method other than greedy (whose rounds are ablate's `--rounds`)."""
    return how in COMBINE_METHODS and how != "greedy"


def ablate(project: Project, spec: str, overrides: list[str] = (), cached_only: bool = False, probs: str | None = None,
           rounds: int | None = None, progress=None, on_member=lambda o: None) -> Ablation:
    g = gather_members(project, spec, overrides, progress, on_member, cached_only=cached_only)
    rounds = rounds or g.ensemble.combine.rounds  # one number of rounds in every table: the ensemble's by default
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
    groups = g.valid_groups()
    rows = []
    for i, o in enumerate(outcomes):
        rest = [j for j in range(len(p)) if j != i and weights[j] > 0]
        without = ensemble.combine([p[j] for j in rest], [weights[j] for j in rest]) if rest else None
        rows.append(MemberRow(
            o.member.name, ensemble.score(metric, p[i], targets), ensemble.log_loss(p[i], targets),
            ensemble.changed(full, p[i], targets),
            None if without is None else ensemble.score(metric, without, targets),
            None if without is None else ensemble.changed(full, without, targets),
            ensemble.paired_bootstrap_metric(metric, p[i], full, targets, groups=groups),
            _mcnemar(p[i], full, targets, groups),
            None if without is None else ensemble.paired_bootstrap_metric(metric, without, full, targets,
                                                                          groups=groups),
            None if without is None else _mcnemar(without, full, targets, groups),
            o.fold_scores(f"{kind}_{metric}") or None))
    subsets = ensemble.subset_scores(p, weights, targets, metric) if len(p) <= MAX_SUBSET_MEMBERS else None
    counts, g_score, g_ll, _ = ensemble.greedy_selection(p, targets, metric, rounds)
    folds = g.blend_folds()
    methods = _methods(g, p, weights, targets, folds, metric, rounds, project.cache / g.competition.name / ".ablate")
    row = {m.method: m for m in methods}
    own = g.ensemble.combine
    greedy = (row["greedy"].honest if own.method != "greedy" or own.rounds == rounds else  # the table's greedy row
              ensemble.blend(Combine(method="greedy", rounds=rounds), p, p, targets, weights, folds, metric).honest)
    subset = (row["subset"].honest, row["subset"].per_fold) if subsets else (None, None)
    return Ablation(g, outcomes, metric, kind, len(targets), ensemble.score(metric, full, targets),
                    ensemble.log_loss(full, targets), rows, subsets, counts, g_score, g_ll, rounds, greedy,
                    subset[0], ensemble.error_correlation(p, targets), methods,
                    "out-of-fold" if g.cv else "holdout", len(np.unique(folds)), _views(outcomes, metric),
                    n_groups=None if groups is None else len(np.unique(groups)), subset_per_fold=subset[1])


def _views(outcomes: list[MemberOutcome], metric: str) -> list[ViewRow]:
    """For each member with TTA views, from its cached arrays: the beta blend and each view alone, and its TTA
    without each view (a view whose removal raises the score is not helping)."""
    from .cache import tta_probs_of

    rows = []
    for o in outcomes:
        m, arrays = o.member, o.entry.arrays
        names = m.tta.view_names
        if not names:
            continue
        score = lambda views: ensemble.score(metric, tta_probs_of(arrays, "valid", m.tta.beta, m.tta_passes, views),
                                             arrays["valid_targets"])  # noqa: E731
        full = score(names)
        rows.append(ViewRow(m.name, "plain + passes" if m.tta_passes else "plain", score([]), None, full))
        for v in names:
            alone = ensemble.score(metric, arrays[f"valid_view_{v}"], arrays["valid_targets"])
            rows.append(ViewRow(m.name, v, alone, score([n for n in names if n != v]), full))
    return rows


def _mcnemar(a: np.ndarray, b: np.ndarray, targets: np.ndarray, groups=None) -> float:
    return ensemble.mcnemar_p(a.argmax(1) == targets, b.argmax(1) == targets, groups)


def _methods(g: Gathered, p: list[np.ndarray], weights: list[float], targets: np.ndarray, folds: np.ndarray,
             metric: str, rounds: int, memo_dir: Path) -> list[MethodRow]:
    """Every `combine:` method on these members (the ensemble's own with its settings), side by side; greedy and
    hill climbing with the ablation's `rounds`, as its greedy selection and `--pick greedy`. Memoised under `memo_dir`
    by everything the rows depend on (the probabilities themselves, targets, folds, weights, settings and the
    blending code): their nested CV (stacking's L-BFGS fits above all) is most of what `ens ablate` costs."""
    import dataclasses
    import hashlib
    import json

    own = g.ensemble.combine
    digest = hashlib.sha256(Path(ensemble.__file__).read_bytes() + Path(__file__).read_bytes())
    for a in (*p, np.asarray(targets), np.asarray(folds), np.asarray(weights, dtype="float64")):
        digest.update(np.ascontiguousarray(a).tobytes())
    digest.update(json.dumps([metric, rounds, own.model_dump(), COMBINE_METHODS]).encode())
    memo = memo_dir / f"{digest.hexdigest()[:24]}.json"
    try:
        return [MethodRow(**row) for row in json.loads(memo.read_text())]
    except (OSError, ValueError, TypeError):
        pass
    rows = []
    for method in COMBINE_METHODS:
        if method == "subset" and len(p) > MAX_SUBSET_MEMBERS:
            continue  # 2^m subsets per fold
        cfg = (own if method == own.method else Combine(method=method)).model_copy(update={"rounds": rounds})
        b = ensemble.blend(cfg, p, p, targets, weights, folds, metric)  # no test rows wanted here
        rows.append(MethodRow(method, b.learned, float(b.in_sample), float(b.honest), [float(x) for x in b.per_fold],
                              float(ensemble.log_loss(b.valid, targets))))
    try:
        write_json(memo, [dataclasses.asdict(r) for r in rows])
    except OSError:
        pass  # a read-only or full cache: the rows are computed again next time
    return rows


def write_selection(result: Ablation, overrides: list[str], dest: Path, how: str) -> Path:
    """An ensemble YAML with the chosen members and weights; everything else as in the source (with overrides)."""
    g = result.gathered
    raw = apply_overrides(read_yaml(g.path), list(overrides))
    chosen, weights = result.pick(how)
    by_name = {m.get("name"): m for m in raw["members"]}
    raw["members"] = [dict(by_name[o.member.name], weight=w) for o, w in zip(chosen, weights)]
    combine = result.combine(how)
    if combine.method != "mean":
        spelled = combine.model_dump(exclude_defaults=True)
        raw["combine"] = spelled["method"] if list(spelled) == ["method"] else spelled
    else:
        raw.pop("combine", None)  # the picked weights are a plain weighted mean
    honest = " (nested cross-validation)" if combine.learned else ""
    header = (f"# written by `ens ablate` from {g.path.name}: {how}, {result.scored_on} {result.metric} "
              f"{result.score_of(how):.4f}{honest} on {result.n_valid} images ({result.probs} probabilities)\n")
    return write_ensemble(dest, raw, header)
