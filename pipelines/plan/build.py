"""The plan of an ensemble: per member (and fold), cached or to train, its stages, batch, statistics and estimated
time; decoded copies and what offline notebooks would need."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..cache import MemberCache, prediction_key, train_key
from ..config import Competition, Ensemble, Member, Project
from ..data.decoded import decoded_bytes  # noqa: F401 - the plan prints it (tests import it from here)
from ..memory import MemoryBudgetError, MicroBatchPlan
from .estimate import (
    PLACEHOLDER_CLASSES,
    MemoryPlans,
    ModelStats,
    estimate,
    other_rates,
    _frozen,
    _images,
    _predict_work,
    _rates,
    _text,
    _train_work,
    memory_memo_path,
)


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class FoldPlan:
    """One model of a cross-validated member: a fold's, or the refit's on every training image."""

    fold: int | str | None  # or 'refit'; None: the holdout split
    n_train: Optional[int]  # the training images minus the fold's (the refit: all of them); None: unknown
    n_valid: Optional[int]  # the fold's images (the refit: none)
    key: Optional[str]  # None: unknown until the data is downloaded (the key hashes the data)
    cached: bool
    known: bool = True  # False: cached or not is unknown (no data); planned as to train
    weights_kept: bool = False
    cached_seconds: Optional[float] = None
    est_train_seconds: Optional[float] = None
    est_predict_seconds: Optional[float] = None
    est_approx: bool = False  # from other competitions' models or the built-in rate (shown with ~)

    @property
    def est_seconds(self) -> Optional[float]:
        if self.est_train_seconds is None:
            return None
        return self.est_train_seconds + (self.est_predict_seconds or 0.0)


@dataclass
class MemberPlan:
    name: str
    arch: str
    key: Optional[str]  # its cache entry; cv: fold 0's (each fold model's in `folds`); None: no data
    cached: bool  # cv: every fold model (and the refit)
    stages: list  # [(size, epochs)]
    frozen_epochs: int  # fine_tune's frozen epochs before the stages (pretrained bodies only)
    effective_batch: int
    device: str
    params: int
    flops: dict  # size text → forward FLOPs per image, per distinct stage size
    memory: Optional[MicroBatchPlan] = None  # CUDA only
    problem: Optional[str] = None  # e.g. does not fit its gpu_memory
    est_train_seconds: Optional[float] = None
    est_predict_seconds: Optional[float] = None
    est_basis: str = ""  # where the rate came from
    est_approx: bool = False  # from other competitions' models or the built-in rate (shown with ~)
    cached_seconds: Optional[float] = None  # train + predict seconds of the cache entry, when cached
    weights_kept: bool = False  # not cached, but its trained weights are: only the prediction is left to do
    folds: list[FoldPlan] = field(default_factory=list)  # cv: its fold models (and the refit); the est_* sum them
    known: bool = True  # False: cached or not is unknown until the data is downloaded
    # training work per training image (Σ epochs × forward GFLOPs, frozen epochs included), with its stages and
    # with every epoch at its final size; None when a size does not fit the arch
    train_gflops: Optional[float] = None
    final_size_gflops: Optional[float] = None
    train_images: Optional[int] = None  # images trained on, summed over its models (cv: fold models); None: unknown
    decode: bool = False
    presizes: list = field(default_factory=list)  # [(h, w)] its decoded copies (decode: true)
    prepare: Optional[dict] = None  # the prepared copy it reads (decoded copies are made from it)
    recipe: str = ""  # label smoothing, mixup/cutmix, EMA (`Member.recipe`)

    @property
    def est_seconds(self) -> Optional[float]:
        if self.est_train_seconds is None:
            return None
        return self.est_train_seconds + (self.est_predict_seconds or 0.0)

    @property
    def staged(self) -> bool:
        return len(self.stages) > 1

    @property
    def saved(self) -> Optional[float]:
        """The fraction of training FLOPs its stages save against every epoch at its final size."""
        if self.train_gflops is None or not self.final_size_gflops:
            return None
        return 1 - self.train_gflops / self.final_size_gflops


@dataclass
class DecodedCopy:
    """One decoded copy (decode: true): the training and test images at one pre-size, shared by the members."""

    hw: tuple[int, int]
    prepare: Optional[dict]  # the prepared copy it is decoded from (None: the originals)
    members: list[str]
    bytes: Optional[int]  # None: the image counts are unknown


@dataclass
class Plan:
    path: Path
    ensemble: Ensemble
    competition: Competition
    device: str
    n_train: Optional[int]  # cv: every training image (a fold model trains on n_train minus its fold); None: unknown
    n_valid: Optional[int]  # cv: 0 (each fold validates its own images)
    n_test: Optional[int]
    members: list[MemberPlan] = field(default_factory=list)
    rate_entries: int = 0  # cached members the estimates are fitted on
    est_from: str = ""  # nothing of this competition measured: where the estimates (~) come from
    models_built: int = 0  # networks built for FLOP counts (0: all from the memo)
    folds: Optional[int] = None  # cv: the competition's number of folds
    data_known: bool = True  # False: the data is not downloaded (what is known comes from the YAMLs)
    data_folder: str = ""  # where the data is (or will be), relative to the project
    n_classes: int = 0  # what the networks were built with
    classes_from: str = "data"  # 'data', 'expected' (the competition's `expected:`) or 'placeholder'
    counts_from: Optional[str] = "data"  # 'data', 'expected' or None (unknown)
    decoded: list[DecodedCopy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. the data disagrees with the competition's `expected:`

    @property
    def to_train(self) -> list[MemberPlan]:
        """Members known to be not cached (and without kept weights)."""
        return [m for m in self.members if m.known and not m.cached and not m.weights_kept]

    @property
    def unknown(self) -> list[MemberPlan]:
        """Members whose cache status is unknown (no data): planned as to train."""
        return [m for m in self.members if not m.known]

    @property
    def est_seconds(self) -> Optional[float]:
        """Estimated seconds for the members to train (and, without the data, every member); None when any of
        them has no estimate."""
        times = [m.est_seconds for m in self.to_train + self.unknown]
        return None if any(t is None for t in times) else sum(times)

    @property
    def train_flops(self) -> tuple[Optional[float], Optional[float]]:
        """(training FLOPs with the members' stages, with every epoch at the final sizes) over the ensemble:
        forward FLOPs × epochs × training images; per training image when the counts are unknown. None when a
        member's FLOPs are unknown."""
        ms = self.members
        if not ms or any(m.train_gflops is None for m in ms):
            return None, None
        images = [m.train_images if m.train_images is not None else 1 for m in ms]
        staged = sum(m.train_gflops * 1e9 * n for m, n in zip(ms, images))
        final = sum(m.final_size_gflops * 1e9 * n for m, n in zip(ms, images))
        return staged, final

    @property
    def decoded_total(self) -> Optional[int]:
        sizes = [c.bytes for c in self.decoded]
        return None if not sizes or None in sizes else sum(sizes)

    @property
    def decoded_ram(self) -> Optional[int]:
        """What training touches at once: the largest copy (a memmap read through the page cache)."""
        sizes = [c.bytes for c in self.decoded]
        return None if not sizes or None in sizes else max(sizes)


def _trained_on(project, member: Member, data, fold):
    """The data `ens run` trains the unit on (with its pseudo-labels); without them when the teacher is not
    cached yet (the unit then shows as to train, as it will be once the teacher is)."""
    from ..errors import EnsError
    from ..run import member_data

    try:
        return member_data(project, member, data, fold)
    except EnsError:
        return data


def _unit(member: Member, fold, data, cache: MemberCache) -> FoldPlan:
    """One model the member needs on `data` (the holdout split, a fold, or the refit): its key, whether cached."""
    train = train_key(member, data.fingerprint)
    key = prediction_key(train, member)
    meta_file = cache.path(key) / "meta.json"
    n_valid = sum(data.is_valid)
    unit = FoldPlan(fold, len(data.train_paths) - n_valid, n_valid, key, meta_file.is_file())
    unit.weights_kept = not unit.cached and cache.model_file(train).is_file()
    if unit.cached:
        try:
            unit.cached_seconds = sum(json.loads(meta_file.read_text())["timings"].values())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return unit


def _detect_device() -> tuple[str, bool]:
    from ..device import cuda_facts

    facts = cuda_facts()  # what training decides with: bf16 only where native
    return ("cuda" if facts["cuda"] else "cpu"), facts["bf16"]


def _offline_units(ens: Ensemble, comp: Competition, n_images: Optional[int]) -> list[FoldPlan]:
    """The models a member needs when the data is not downloaded: their image counts from `n_images` (the
    competition's `expected:`; the split's validation share and a fold's 1/k, rounded) or unknown; keys unknown."""
    def unit(fold, n_valid):
        n_train = None if n_images is None else n_images - n_valid
        return FoldPlan(fold, n_train, None if n_images is None else n_valid, None, False, known=False)

    if ens.validation != "cv":
        return [unit(None, round(n_images * comp.split.valid_pct) if n_images is not None else 0)]
    k = comp.cv.folds
    units = [unit(f, round(n_images / k) if n_images is not None else 0) for f in range(k)]
    if ens.refit == "full":
        units.append(unit("refit", 0))
    return units


def _expected_notes(comp: Competition, n_classes: int, n_images: int, n_test: int) -> list[str]:
    """Where the data disagrees with the competition's `expected:` (a wrong copy from the page, or other data)."""
    e = comp.expected
    if e is None:
        return []
    pairs = (("classes", e.classes, n_classes), ("train_images", e.train_images, n_images),
             ("test_images", e.test_images, n_test))
    wrong = [f"{name} {want} (the data has {have})" for name, want, have in pairs if want is not None and want != have]
    return [f"competitions/{comp.name}.yaml expected: says {', '.join(wrong)}; the data governs"] if wrong else []


def _decoded_copies(members: list[MemberPlan], n_images: Optional[int]) -> list[DecodedCopy]:
    """The decoded copies of the members with decode: true: one per pre-size (and prepared copy it is decoded
    from), however many members and folds read it; `n_images` training + test images, None: unknown."""
    copies: dict = {}
    for m in members:
        if not m.decode:
            continue
        for hw in m.presizes:
            key = (tuple(hw), json.dumps(m.prepare, sort_keys=True))
            if key not in copies:
                copies[key] = DecodedCopy(tuple(hw), m.prepare, [],
                                          None if n_images is None else decoded_bytes(n_images, hw))
            copies[key].members.append(m.name)
    return sorted(copies.values(), key=lambda c: (c.hw[0] * c.hw[1], c.hw))


def plan_ensemble(project: Project, spec: str, overrides: list[str] = (), *, device: Optional[str] = None,
                  bf16_supported: Optional[bool] = None, probe: Optional[Callable] = None,
                  memo: Optional[Path] = None, build: Optional[Callable] = None, card: Optional[str] = None) -> Plan:
    """What `ens run` would do, without training. The keyword arguments are for tests: `device` ("cpu"/"cuda",
    default detected), `probe` (memory.cuda_probe's signature, default the real one), `memo` (the FLOP memo
    file; the memory plans' memo lies beside it), `build` (models.build_model's signature), `card` (the CUDA
    card memory plans are memoised for; detected with the device, none when `device` is given without it).
    Before the data is downloaded: what the YAMLs tell (see the module docstring); nothing is downloaded."""
    from ..device import resolve_precision
    from ..memory import cuda_probe, plan_member
    from ..models import build_model
    from ..run import check_ensemble, config_warnings, weights_notes
    from ..unit import fold_variants

    path, ens, comp = check_ensemble(project, spec, list(overrides))
    data_known = bool(comp.builtin) or comp.data_path(project).is_dir()  # an embedded one is built, not downloaded
    notes = config_warnings(ens, list(overrides)) + weights_notes(ens)
    if data_known:
        from ..data import load_data

        data = load_data(project, comp)
        variants, fold_ids = fold_variants(ens, data, None, project.relative(path))  # what `ens run` would train
        n_classes, classes_from, counts_from = len(data.vocab), "data", "data"
        n_images, n_test, holdout_valid = len(data.train_paths), len(data.test_paths), sum(data.is_valid)
        notes += _expected_notes(comp, n_classes, n_images, n_test)
    else:
        expected = comp.expected
        variants = fold_ids = None
        n_classes, classes_from = ((expected.classes, "expected") if expected and expected.classes
                                   else (PLACEHOLDER_CLASSES, "placeholder"))
        n_images = expected.train_images if expected else None
        n_test = expected.test_images if expected else None
        counts_from = "expected" if n_images is not None and n_test is not None else None
        if counts_from is None:
            n_images = n_test = None
        holdout_valid = round(n_images * comp.split.valid_pct) if n_images is not None else None
    cv = ens.validation == "cv"
    n_valid = None if holdout_valid is None else 0 if cv else holdout_valid
    if device is None:
        device, detected_bf16 = _detect_device()
        bf16_supported = detected_bf16 if bf16_supported is None else bf16_supported
        if device == "cuda" and card is None:
            from ..device import cuda_facts

            card = cuda_facts().get("card")
    bf16_supported = bool(bf16_supported)
    cache = MemberCache(project.cache, comp.name)
    stats = ModelStats(memo, build)
    memory_plans = MemoryPlans(memory_memo_path(memo), card if device == "cuda" else None)
    rates = [] if counts_from is None else _rates(cache, device, stats, n_classes,
                                                  lambda c: _images(c, n_images, holdout_valid, n_test))
    others = {} if rates or counts_from is None else other_rates(project.cache, comp.name, device, stats, n_classes)
    plan = Plan(path, ens, comp, device, None if n_images is None else n_images - n_valid, n_valid, n_test,
                rate_entries=len(rates), folds=comp.cv.folds if cv else None, data_known=data_known,
                data_folder=project.relative(comp.data_path(project)), n_classes=n_classes,
                classes_from=classes_from, counts_from=counts_from, notes=notes)
    for member in ens.members:
        if data_known:
            units = [_unit(member, fold, _trained_on(project, member, d, fold), cache) for fold, d, _ in variants]
        else:
            units = _offline_units(ens, comp, n_images)
        stages = [(s if isinstance(s, int) else tuple(s), e) for s, e in member.stage_plan]
        sizes = list(dict.fromkeys(s for s, _ in stages))
        params, flops = stats.get(member.arch, n_classes, member.final_size, sizes)
        mp = MemberPlan(member.name, member.arch, units[0].key, all(u.cached for u in units), stages,
                        _frozen(member.pretrained, member.freeze_epochs), member.batch_size, device, params, flops,
                        folds=units if cv else [], known=data_known, decode=member.decode, recipe=member.recipe(),
                        presizes=list(member.presizes),
                        prepare=member.prepare.model_dump() if member.prepare else None)
        mp.weights_kept = not mp.cached and all(u.cached or u.weights_kept for u in units)
        seconds = [u.cached_seconds for u in units if u.cached]
        mp.cached_seconds = sum(seconds) if seconds and None not in seconds else None
        if all(u.n_train is not None for u in units):
            mp.train_images = sum(u.n_train for u in units)
        unfit = [s for s in sizes if flops[_text(s)] is None]
        if unfit:
            reason = stats.error(member.arch, n_classes, member.final_size, unfit[0])
            mp.problem = (f"member {member.name}: size {_text(unfit[0])} is too small for {member.arch} or does not "
                          f"fit it ({reason}); choose a larger size")
            plan.members.append(mp)
            continue
        gflops = lambda s: flops[_text(s)] / 1e9  # noqa: E731
        final = stages[-1][0]
        mp.train_gflops = _train_work(1, stages, mp.frozen_epochs, gflops)
        mp.final_size_gflops = _train_work(1, [(final, member.total_epochs)], mp.frozen_epochs, gflops)
        for u in units:
            if u.n_train is None:
                continue
            est = estimate(rates, others, device, member.arch, _train_work(u.n_train, stages, mp.frozen_epochs, gflops),
                           _predict_work(u.n_valid + n_test, member.tta.n, member.final_size, gflops))
            if est:
                u.est_train_seconds, u.est_predict_seconds, mp.est_basis, u.est_approx = est
                mp.est_approx = mp.est_approx or u.est_approx
                if u.est_approx and not u.cached:
                    plan.est_from = mp.est_basis
                if u.weights_kept:
                    u.est_train_seconds = 0.0
        todo = [u for u in units if not u.cached] or units  # what is left to do (all cached: what it cost)
        if all(u.est_train_seconds is not None for u in todo):
            mp.est_train_seconds = sum(u.est_train_seconds for u in todo)
            mp.est_predict_seconds = sum(u.est_predict_seconds or 0.0 for u in todo)
        if device == "cuda":
            precision = resolve_precision(member.precision, True, bf16_supported)
            factory = lambda m=member: (build or build_model)(m.arch, n_classes, m.final_size)  # noqa: E731
            try:
                mp.memory = memory_plans.plan(member, n_classes, precision, lambda: plan_member(
                    member, factory, precision, probe=probe or cuda_probe))
            except MemoryBudgetError as e:
                mp.problem = str(e)
        plan.members.append(mp)
    plan.decoded = _decoded_copies(plan.members, None if n_images is None else n_images + n_test)
    stats.save()
    memory_plans.save()
    plan.models_built = stats.built
    return plan
