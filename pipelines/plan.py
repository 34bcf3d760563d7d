"""`ens plan ENSEMBLE`: a dry run. Per member: cached or to train, stages, batch (and on CUDA the micro-batch and
accumulation that fit its `gpu_memory`), parameters, FLOPs per image, and an estimated time. Nothing is trained
and no cache entry is written (only the data fingerprint memo, as by every command that reads the data).

Parameters and FLOPs are counted on the network `build_learner` trains (fastai body and head, random weights:
nothing is downloaded), with torch's FlopCounterMode on a forward pass of one image at each stage size, and
memoised per (arch, build size, classes) and library versions in ~/.cache/ens/, so a second plan builds nothing.

The time estimate is a rate fitted on what was trained before: every cached member of the same competition on the
same device gives seconds per (image · forward GFLOP) of training work,

    work = training images × (Σ_stages epochs × GFLOPs(stage size) + frozen epochs × GFLOPs(first size))

(prediction likewise: (TTA passes + 1) × (validation + test images) × GFLOPs(final size)). Members with the same
arch pool only their own entries (the FLOP rate differs a lot between architectures: attention vs. convolutions,
data loading that dominates tiny models); other members pool all entries on the device. A rough guide, no more:
it knows nothing of batch size, workers or precision beyond what the measured entries had.

A cross-validated ensemble (`validation: cv`) is planned members × folds: each fold model (and the refit of
`refit: full`) is its own cache entry, cached or to train, estimated on its own training images (all but its
fold's; the refit's: all); a member's time is the sum over the fold models still to compute.

Progressive resizing (`stages:`) is costed against the same member trained every epoch at its final size: the
training work above for both, its ratio the FLOPs saved (per member, and for the ensemble).

Members with `decode: true` read uint8 copies of the training and test images decoded once per pre-size
(`Member.presizes`): the plan gives their disk, (training + test images) × h × w × 3 bytes per copy, each copy
counted once (every member and fold at that pre-size, reading the same originals or prepared copy, shares it),
and the RAM training touches at once: the largest copy, read through the page cache as a memmap.

Before the data is downloaded the plan says what it can: members, stages, parameters and FLOPs (sized by the
competition's `expected: {classes}`, else counted with a 2-class head, a lower bound), FLOPs saved, and, given
`expected:` image counts, time estimates and the decoded copies' disk; whether a member is cached is unknown (its
cache key hashes the data). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .cache import MemberCache, prediction_key, train_key
from .config import Competition, Ensemble, Member, Project, is_classical
from .data.decoded import decoded_bytes  # noqa: F401 - the plan prints it (tests import it from here)
from .memory import MemoryBudgetError, MicroBatchPlan, _size_text
from .models import package_version
from .util import user_cache, write_json


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _text(size) -> str:
    return _size_text(size if isinstance(size, int) else tuple(size))


# the class count the networks are built with when neither the data nor the competition's `expected:` gives one:
# the fewest a classifier has, so parameters and FLOPs are lower bounds (more classes only widen the last layer)
PLACEHOLDER_CLASSES = 2


# --------------------------------------------------------------------------------------------- params and FLOPs
def flops_memo_path() -> Path:
    versions = "-".join(f"{short}{package_version(p)}" for short, p in
                        (("torch", "torch"), ("timm", "timm"), ("tv", "torchvision"), ("fastai", "fastai")))
    return user_cache() / f"flops-{versions}.json"


def count_flops(model, size) -> int:
    """Forward FLOPs of one image at `size` (torch's FlopCounterMode: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = _hw(size)
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, h, w))
    return int(counter.get_total_flops())


class ModelStats:
    """params and forward FLOPs per (arch, build size, classes), memoised in a JSON file."""

    def __init__(self, memo: Optional[Path] = None, build: Optional[Callable] = None):
        self.memo = memo or flops_memo_path()
        try:
            self.table = json.loads(self.memo.read_text())
        except (OSError, ValueError):
            self.table = {}
        self.dirty = False
        self.built = 0  # models built in this session (0 when everything came from the memo)
        self._build = build

    def _entry(self, arch: str, n_classes: int, final_size) -> tuple[str, dict]:
        key = f"{arch}|{_text(final_size)}|{n_classes}"
        entry = self.table.setdefault(key, {"params": None, "flops": {}})
        entry.setdefault("errors", {})
        return key, entry

    def get(self, arch: str, n_classes: int, final_size, sizes) -> tuple[int, dict[str, Optional[int]]]:
        """(params, {size text: forward FLOPs per image}) of `arch` built for `final_size`, at each of `sizes`;
        None for a size the network cannot take (its reason in `error`)."""
        if is_classical(arch):  # no network: features and a scikit-learn classifier
            return 0, {_text(s): 0 for s in sizes}
        key, entry = self._entry(arch, n_classes, final_size)
        missing = [s for s in sizes if _text(s) not in entry["flops"]]
        if entry["params"] is None or missing:
            build = self._build
            if build is None:
                from .models import build_model as build
            model = build(arch, n_classes, final_size)
            self.built += 1
            entry["params"] = sum(p.numel() for p in model.parameters())
            for s in missing:
                try:
                    entry["flops"][_text(s)] = count_flops(model, s)
                except RuntimeError as e:  # e.g. a size too small for the arch's downsampling
                    entry["flops"][_text(s)] = None
                    entry["errors"][_text(s)] = str(e).splitlines()[0][:200]
            self.dirty = True
        return entry["params"], {_text(s): entry["flops"][_text(s)] for s in sizes}

    def error(self, arch: str, n_classes: int, final_size, size) -> Optional[str]:
        return self._entry(arch, n_classes, final_size)[1]["errors"].get(_text(size))

    def save(self) -> None:
        if not self.dirty:
            return
        try:  # merge with what another process may have written meanwhile
            on_disk = json.loads(self.memo.read_text())
        except (OSError, ValueError):
            on_disk = {}
        for k, v in self.table.items():
            old = on_disk.get(k) or {"params": None, "flops": {}}
            on_disk[k] = {"params": v["params"] or old["params"], "flops": {**old["flops"], **v["flops"]},
                          "errors": {**old.get("errors", {}), **v.get("errors", {})}}
        write_json(self.memo, on_disk, indent=0, sort_keys=True)
        self.dirty = False


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


def _train_work(n_train: int, stages, frozen_epochs: int, gflops: Callable) -> float:
    """image · GFLOP of training (see the module docstring)."""
    work = sum(epochs * gflops(size) for size, epochs in stages)
    if frozen_epochs:
        work += frozen_epochs * gflops(stages[0][0])
    return n_train * work


def _predict_work(n_images: int, tta_n: int, final_size, gflops: Callable) -> float:
    return (tta_n + 1) * n_images * gflops(final_size)


@dataclass
class _Rate:
    arch: str
    train_seconds: float
    train_work: float
    predict_seconds: float
    predict_work: float


def _frozen(pretrained, freeze_epochs) -> int:
    return int(freeze_epochs or 0) if pretrained else 0


def _images(cv: Optional[dict], n_images: int, n_valid: int, n_test: int) -> tuple[int, int]:
    """(images trained on, images predicted) of a cache entry by its `cv`: a holdout member's; a fold model's (its
    fold taken as 1/folds of the images); a refit's (every image; only the test images predicted)."""
    if not cv:
        return n_images - n_valid, n_valid + n_test
    if cv.get("fold") == "refit":
        return n_images, n_test
    fold = round(n_images / int(cv["folds"]))
    return n_images - fold, fold + n_test


def _rates(cache: MemberCache, device: str, stats: ModelStats, n_classes: int, images: Callable) -> list[_Rate]:
    """One measured rate per cached model trained on `device` (entries that cannot be read are skipped);
    `images(meta["cv"])` is (images trained on, images predicted) of an entry."""
    rates = []
    for meta in cache.entries():
        try:
            if meta.get("damaged") or meta.get("device") != device or meta.get("computed", "trained") != "trained":
                continue  # entries predicted from kept weights or derived from others measure no training
            k, t = meta["key_fields"], meta["timings"]
            n_train, n_pred = images(meta.get("cv"))
            stages = [(s if isinstance(s, int) else tuple(s), e) for s, e in k["stages"]]
            final = stages[-1][0]
            sizes = list(dict.fromkeys(s for s, _ in stages))
            _, flops = stats.get(k["arch"], n_classes, final, sizes)
            if any(f is None for f in flops.values()):
                continue
            gflops = lambda s: flops[_text(s)] / 1e9  # noqa: E731
            train_work = _train_work(n_train, stages, _frozen(k.get("pretrained"), k.get("freeze_epochs")), gflops)
            predict_work = _predict_work(n_pred, int(k.get("tta", {}).get("n", 4)), final, gflops)
            if train_work > 0 and t.get("train_seconds"):
                rates.append(_Rate(k["arch"], float(t["train_seconds"]), train_work,
                                   float(t.get("predict_seconds") or 0.0), predict_work))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            continue  # an entry of an older format, or an arch this installation cannot build
    return rates


def _estimate(rates: list[_Rate], arch: str, train_work: float, predict_work: float) -> tuple[float, float, str] | None:
    same = [r for r in rates if r.arch == arch]
    pool = same or rates
    if not pool:
        return None
    train_rate = sum(r.train_seconds for r in pool) / sum(r.train_work for r in pool)
    predict_rate = sum(r.predict_seconds for r in pool) / sum(r.predict_work for r in pool)
    basis = f"{arch}, {len(same)} cached" if same else f"{len(pool)} cached member{'s' * (len(pool) > 1)}"
    return train_rate * train_work, predict_rate * predict_work, basis


def _trained_on(project, member: Member, data, fold):
    """The data `ens run` trains the unit on (with its pseudo-labels); without them when the teacher is not
    cached yet (the unit then shows as to train, as it will be once the teacher is)."""
    from .errors import EnsError
    from .run import gather_members
    from .unit import member_data

    try:
        return member_data(project, member, data, fold, gather=gather_members)
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
    from .device import cuda_facts

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
                  memo: Optional[Path] = None, build: Optional[Callable] = None) -> Plan:
    """What `ens run` would do, without training. The keyword arguments are for tests: `device` ("cpu"/"cuda",
    default detected), `probe` (memory.cuda_probe's signature, default the real one), `memo` (the FLOP memo
    file), `build` (models.build_model's signature). Before the data is downloaded: what the YAMLs tell (see the
    module docstring); nothing is downloaded."""
    from .memory import cuda_probe, plan_member
    from .models import build_model
    from .run import check_ensemble
    from .unit import fold_variants
    from .device import resolve_precision

    path, ens, comp = check_ensemble(project, spec, list(overrides))
    data_known = bool(comp.builtin) or comp.data_path(project).is_dir()  # an embedded one is built, not downloaded
    notes = []
    if data_known:
        from .data import load_data

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
    bf16_supported = bool(bf16_supported)
    cache = MemberCache(project.cache, comp.name)
    stats = ModelStats(memo, build)
    rates = [] if counts_from is None else _rates(cache, device, stats, n_classes,
                                                  lambda c: _images(c, n_images, holdout_valid, n_test))
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
            est = _estimate(rates, member.arch, _train_work(u.n_train, stages, mp.frozen_epochs, gflops),
                            _predict_work(u.n_valid + n_test, member.tta.n, member.final_size, gflops))
            if est:
                u.est_train_seconds, u.est_predict_seconds, mp.est_basis = est
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
                mp.memory = plan_member(member, factory, precision, probe=probe or cuda_probe)
            except MemoryBudgetError as e:
                mp.problem = str(e)
        plan.members.append(mp)
    plan.decoded = _decoded_copies(plan.members, None if n_images is None else n_images + n_test)
    stats.save()
    plan.models_built = stats.built
    return plan


# --------------------------------------------------------------------------------------------- printing
def _si(n: float | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _flop(n: float) -> str:
    """5.94e15 → '5.94 PFLOP'."""
    text = _si(n)
    return f"{text[:-1]} {text[-1]}FLOP" if text[-1:].isalpha() else f"{text} FLOP"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def _time(unit) -> str:
    """A member's or fold model's time: measured in parentheses when cached, else the estimate."""
    if unit.cached:
        return f"({_duration(unit.cached_seconds)})" if unit.cached_seconds is not None else ""
    return _duration(unit.est_seconds)


def _unit_status(unit) -> str:
    if not unit.known:
        return "unknown"
    return "cached" if unit.cached else "to predict" if unit.weights_kept else "to train"


_COLOURS = {"cached": "green", "to predict": "cyan", "to train": "yellow", "unknown": "magenta"}


def _status(m: MemberPlan) -> str:
    """'cached' | 'to predict' | 'to train' | 'unknown' (no data); cv: e.g. '1/3 folds cached, 2 to train, refit
    to train'."""
    if not m.known:
        return "[magenta]unknown[/]"
    if not m.folds:
        status = _unit_status(m)
        return f"[{_COLOURS[status]}]{status}[/]"
    folds = [u for u in m.folds if u.fold != "refit"]
    counts = {s: sum(_unit_status(u) == s for u in folds) for s in _COLOURS}
    parts = [f"{counts['cached']}/{len(folds)} folds cached"]
    parts += [f"{counts[s]} {s}" for s in ("to predict", "to train") if counts[s]]
    parts += [f"refit {_unit_status(u)}" for u in m.folds if u.fold == "refit"]
    colour = "green" if m.cached else "cyan" if m.weights_kept else "yellow"
    return f"[{colour}]{', '.join(parts)}[/]"


def _count(n: Optional[int], approx: bool) -> str:
    return "?" if n is None else f"≈{n}" if approx else str(n)


def _fold_table(plan: Plan):
    """Members × fold models: each cached (its time) or to compute (its estimate), under the fold's sizes."""
    from rich.table import Table

    approx = not plan.data_known
    table = Table(title=f"fold models ({plan.folds} folds of {_count(plan.n_train, approx)} training images)")
    table.add_column("member")
    for u in plan.members[0].folds:
        valid = f", {_count(u.n_valid, approx)} valid" if u.n_valid or (approx and u.fold != "refit") else ""
        name = "refit" if u.fold == "refit" else f"fold {u.fold}"
        table.add_column(f"{name}\n{_count(u.n_train, approx)} train{valid}", justify="right")
    for m in plan.members:
        cells = []
        for u in m.folds:
            status = _unit_status(u)
            cells.append(f"[{_COLOURS[status]}]{status}[/] {_time(u)}")
        table.add_row(m.name, *cells)
    return table


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _title(plan: Plan) -> str:
    folds = f" in {plan.folds} folds" if plan.folds else ""
    if plan.data_known:
        images = f"{plan.n_train} training images{folds}"
    elif plan.n_train is not None:
        images = f"≈{plan.n_train} training images{folds} by expected:, data not downloaded"
    else:
        images = f"data not downloaded{folds}"
    return f"{plan.path.name} on {plan.competition.name}: plan on {plan.device} ({images})"


def _summary(plan: Plan) -> str:
    """The members line: cached / to predict / to train, and the estimated time."""
    if not plan.data_known:
        line = f"{len(plan.members)} members: cached or not is unknown until the data is downloaded"
        todo = plan.unknown
        them = "them all"
    else:
        todo = plan.to_train
        kept = sum(m.weights_kept for m in plan.members)
        line = (f"{len(plan.members)} members: {len(plan.members) - len(todo) - kept} cached, "
                + (f"{kept} to predict (weights kept), " if kept else "") + f"{len(todo)} to train")
        if plan.folds:
            units = [u for m in plan.members for u in m.folds]
            line += (f" ({sum(not u.cached and not u.weights_kept for u in units)} of {len(units)} fold models to "
                     "train)")
        them = ""
    if todo:
        known = [m.est_seconds for m in todo if m.est_seconds is not None]
        if plan.est_seconds is not None:
            line += f"; estimated {_duration(plan.est_seconds)}" + (f" to train {them}" if them else "")
        elif known:
            line += f"; estimated {_duration(sum(known))} for {len(known)} of them"
        if len(known) < len(todo) and plan.counts_from is None:
            line += "; no time estimate (the image counts are unknown)"
        elif len(known) < len(todo) and plan.rate_entries == 0:
            line += f" (no estimate: nothing of {plan.competition.name} was trained on {plan.device} yet)"
        elif known:
            line += f" (from {plan.rate_entries} cached member{'s' * (plan.rate_entries > 1)} on {plan.device}, by FLOPs)"
    return line


def _saved_line(plan: Plan) -> Optional[str]:
    """What progressive resizing saves over the ensemble, when a member has stages."""
    staged, at_final = plan.train_flops
    if not any(m.staged for m in plan.members) or staged is None or not at_final:
        return None
    if plan.counts_from is None:
        per = "per training image, the image counts being unknown"
    else:
        per = (f"× the training images of every fold model" if plan.folds else
               f"× {'≈' if not plan.data_known else ''}{plan.n_train} training images")
    return (f"progressive resizing: {1 - staged / at_final:.0%} fewer training FLOPs, {_flop(staged)} instead of "
            f"{_flop(at_final)} with every epoch at each member's final size (forward FLOPs × epochs, frozen "
            f"epochs included, {per})")


def _decoded_line(plan: Plan) -> Optional[str]:
    if not plan.decoded:
        return None
    same_hw = {c.hw for c in plan.decoded if sum(d.hw == c.hw for d in plan.decoded) > 1}

    def name(c: DecodedCopy) -> str:
        text = f"{c.hw[0]}x{c.hw[1]}"
        if c.hw in same_hw:
            text += f" (from {'the max_size ' + str(c.prepare['max_size']) + ' copy' if c.prepare else 'the originals'})"
        return text

    where = f"cache/decoded/{plan.competition.name}/"
    if plan.decoded_total is None:
        return (f"decoded copies (decode: true): {len(plan.decoded)}, at {', '.join(map(name, plan.decoded))}, in "
                f"{where}; their size is unknown without the image counts")
    n = plan.n_train + plan.n_valid + plan.n_test
    source = "" if plan.data_known else " (by expected:)"
    sizes = ", ".join(f"{name(c)} {_bytes(c.bytes)}" for c in plan.decoded)
    return (f"decoded copies (decode: true) of the {n} training and test images{source}, one per pre-size shared by "
            f"its members: {sizes}; {_bytes(plan.decoded_total)} on disk in {where}; training reads one at a time "
            f"as a memmap through the page cache: up to {_bytes(plan.decoded_ram)} of RAM (the largest copy)")


def _unknown_line(plan: Plan) -> Optional[str]:
    """One line: what is not known without the data, and the command that fixes it."""
    if plan.data_known:
        return None
    comp = plan.competition
    yaml_file = f"competitions/{comp.name}.yaml"
    missing = ["whether each member is cached (cache keys hash the data)"]
    if plan.classes_from == "placeholder":
        missing.append(f"the class count (params and FLOPs counted with a {PLACEHOLDER_CLASSES}-class head: lower "
                       "bounds, marked ≥)")
    if plan.counts_from is None:
        missing.append("the image counts (no time estimate, no decoded-copy size)")
    given = [what for what, src in (("classes", plan.classes_from), ("image counts", plan.counts_from))
             if src == "expected"]
    known = f"; {' and '.join(given)} from {yaml_file} expected:" if given else ""
    fix = (f"`ens data {comp.name}` downloads it" if comp.kaggle else
           f"put the competition's files in {plan.data_folder} (or set data_dir)")
    if plan.classes_from == "placeholder" or plan.counts_from is None:
        fix += (f", or copy expected: {{classes: N, train_images: N, test_images: N}} from the competition's page "
                f"into {yaml_file}")
    return f"not known before the data is downloaded ({plan.data_folder} is missing): {', '.join(missing)}{known}. {fix}"


def render(plan: Plan, console) -> None:
    """The plan as a rich table and its lines: members, FLOPs saved, decoded copies, what is not known."""
    from rich.markup import escape
    from rich.table import Table

    staged = any(m.staged for m in plan.members)
    recipe = any(m.recipe for m in plan.members)
    table = Table(title=_title(plan))
    columns = ["member", "arch", "stages", *(["recipe"] if recipe else []), "batch", "params", "FLOPs/img",
               *(["FLOPs saved"] if staged else []), "status", "est. time"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("member", "arch", "status", "stages", "recipe") else "right",
                         no_wrap=col in ("arch",))
    lower = "≥" if plan.classes_from == "placeholder" else ""
    for m in plan.members:
        stages = " → ".join(f"{_text(s)}×{e}" for s, e in m.stages)
        if m.frozen_epochs:
            stages = f"frozen×{m.frozen_epochs}, " + stages
        batch = str(m.effective_batch)
        if m.memory is not None:
            batch = f"{m.effective_batch} = {m.memory.describe()}" if m.memory.accumulation_steps > 1 else batch
        elif m.problem and m.device == "cuda":
            batch += " [red](does not fit)[/]"
        flops = " → ".join(lower + _si(m.flops[_text(s)]) if m.flops[_text(s)] is not None else "[red]fails[/]"
                           for s in dict.fromkeys(s for s, _ in m.stages))
        saved = ([f"{m.saved:.0%}" if m.staged and m.saved is not None else ""] if staged else [])
        table.add_row(m.name, m.arch, stages, *([m.recipe or "—"] if recipe else []), batch, lower + _si(m.params),
                      flops, *saved, _status(m), _time(m))
    console.print(table)
    if plan.folds:
        console.print(_fold_table(plan))
    for m in plan.members:
        if m.problem:
            console.print(f"[red]problem:[/] {escape(m.problem)}", highlight=False, soft_wrap=True)
    console.print(_summary(plan), highlight=False)
    for line in (_saved_line(plan), _decoded_line(plan)):
        if line:
            console.print(escape(line), highlight=False, soft_wrap=True)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    unknown = _unknown_line(plan)
    if unknown:
        console.print(f"[magenta]{escape(unknown)}[/]", highlight=False, soft_wrap=True)
