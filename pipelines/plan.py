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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .cache import MemberCache, prediction_key, train_key
from .config import Competition, Ensemble, Member, Project
from .errors import EnsError
from .memory import MemoryBudgetError, MicroBatchPlan, _size_text
from .models import package_version
from .util import user_cache, write_json


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _text(size) -> str:
    return _size_text(size if isinstance(size, int) else tuple(size))


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

    fold: int | str  # or 'refit'
    n_train: int  # the training images minus the fold's (the refit: all of them)
    n_valid: int  # the fold's images (the refit: none)
    key: str
    cached: bool
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
    key: str  # its cache entry; cv: fold 0's (each fold model's in `folds`)
    cached: bool  # cv: every fold model (and the refit)
    cached: bool
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

    @property
    def est_seconds(self) -> Optional[float]:
        if self.est_train_seconds is None:
            return None
        return self.est_train_seconds + (self.est_predict_seconds or 0.0)


@dataclass
class Plan:
    path: Path
    ensemble: Ensemble
    competition: Competition
    device: str
    n_train: int  # cv: every training image (a fold model trains on n_train minus its fold)
    n_valid: int  # cv: 0 (each fold validates its own images)
    n_test: int
    members: list[MemberPlan] = field(default_factory=list)
    rate_entries: int = 0  # cached members the estimates are fitted on
    models_built: int = 0  # networks built for FLOP counts (0: all from the memo)
    folds: Optional[int] = None  # cv: the competition's number of folds

    @property
    def to_train(self) -> list[MemberPlan]:
        return [m for m in self.members if not m.cached and not m.weights_kept]

    @property
    def est_seconds(self) -> Optional[float]:
        """Estimated seconds for the members to train; None when any of them has no estimate."""
        times = [m.est_seconds for m in self.to_train]
        return None if any(t is None for t in times) else sum(times)


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


def plan_ensemble(project: Project, spec: str, overrides: list[str] = (), *, device: Optional[str] = None,
                  bf16_supported: Optional[bool] = None, probe: Optional[Callable] = None,
                  memo: Optional[Path] = None, build: Optional[Callable] = None) -> Plan:
    """What `ens run` would do, without training. The keyword arguments are for tests: `device` ("cpu"/"cuda",
    default detected), `probe` (memory.cuda_probe's signature, default the real one), `memo` (the FLOP memo
    file), `build` (models.build_model's signature)."""
    from .data import load_data
    from .memory import cuda_probe, plan_member
    from .models import build_model
    from .run import fold_variants, check_ensemble
    from .train import resolve_precision

    path, ens, comp = check_ensemble(project, spec, list(overrides))
    if not comp.builtin and not comp.data_path(project).is_dir():
        raise EnsError(f"competitions/{comp.name}.yaml: data folder {project.relative(comp.data_path(project))} "
                       f"is missing; `ens plan` downloads nothing: run `ens data {comp.name}` first")
    data = load_data(project, comp)
    variants, fold_ids = fold_variants(ens, data, None, project.relative(path))  # what `ens run` would train
    cv = fold_ids is not None
    n_classes = len(data.vocab)
    n_images, n_test, holdout_valid = len(data.train_paths), len(data.test_paths), sum(data.is_valid)
    n_valid = 0 if cv else holdout_valid
    if device is None:
        device, detected_bf16 = _detect_device()
        bf16_supported = detected_bf16 if bf16_supported is None else bf16_supported
    bf16_supported = bool(bf16_supported)
    cache = MemberCache(project.cache, comp.name)
    stats = ModelStats(memo, build)
    rates = _rates(cache, device, stats, n_classes, lambda c: _images(c, n_images, holdout_valid, n_test))
    plan = Plan(path, ens, comp, device, n_images - n_valid, n_valid, n_test, rate_entries=len(rates),
                folds=comp.cv.folds if cv else None)
    for member in ens.members:
        units = [_unit(member, fold, d, cache) for fold, d, _ in variants]
        stages = [(s if isinstance(s, int) else tuple(s), e) for s, e in member.stage_plan]
        sizes = list(dict.fromkeys(s for s, _ in stages))
        params, flops = stats.get(member.arch, n_classes, member.final_size, sizes)
        mp = MemberPlan(member.name, member.arch, units[0].key, all(u.cached for u in units), stages,
                        _frozen(member.pretrained, member.freeze_epochs), member.batch_size, device, params, flops,
                        folds=units if cv else [])
        mp.weights_kept = not mp.cached and all(u.cached or u.weights_kept for u in units)
        seconds = [u.cached_seconds for u in units if u.cached]
        mp.cached_seconds = sum(seconds) if seconds and None not in seconds else None
        unfit = [s for s in sizes if flops[_text(s)] is None]
        if unfit:
            reason = stats.error(member.arch, n_classes, member.final_size, unfit[0])
            mp.problem = (f"member {member.name}: size {_text(unfit[0])} is too small for {member.arch} or does not "
                          f"fit it ({reason}); choose a larger size")
            plan.members.append(mp)
            continue
        gflops = lambda s: flops[_text(s)] / 1e9  # noqa: E731
        for u in units:
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
    stats.save()
    plan.models_built = stats.built
    return plan


# --------------------------------------------------------------------------------------------- printing
def _si(n: float | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


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
    return "cached" if unit.cached else "to predict" if unit.weights_kept else "to train"


_COLOURS = {"cached": "green", "to predict": "cyan", "to train": "yellow"}


def _status(m: MemberPlan) -> str:
    """'cached' | 'to predict' | 'to train'; cv: e.g. '1/3 folds cached, 2 to train, refit to train'."""
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


def _fold_table(plan: Plan):
    """Members × fold models: each cached (its time) or to compute (its estimate), under the fold's sizes."""
    from rich.table import Table

    table = Table(title=f"fold models ({plan.folds} folds of {plan.n_train} training images)")
    table.add_column("member")
    for u in plan.members[0].folds:
        valid = f", {u.n_valid} valid" if u.n_valid else ""
        name = "refit" if u.fold == "refit" else f"fold {u.fold}"
        table.add_column(f"{name}\n{u.n_train} train{valid}", justify="right")
    for m in plan.members:
        cells = []
        for u in m.folds:
            status = _unit_status(u)
            cells.append(f"[{_COLOURS[status]}]{status}[/] {_time(u)}")
        table.add_row(m.name, *cells)
    return table


def render(plan: Plan, console) -> None:
    """The plan as a rich table and a totals line."""
    from rich.markup import escape
    from rich.table import Table

    folds = f" in {plan.folds} folds" if plan.folds else ""
    table = Table(title=f"{plan.path.name} on {plan.competition.name}: plan on {plan.device} "
                        f"({plan.n_train} training images{folds})")
    for col in ("member", "arch", "stages", "batch", "params", "FLOPs/img", "status", "est. time"):
        table.add_column(col, justify="left" if col in ("member", "arch", "status", "stages") else "right",
                         no_wrap=col in ("arch",))
    for m in plan.members:
        stages = " → ".join(f"{_text(s)}×{e}" for s, e in m.stages)
        if m.frozen_epochs:
            stages = f"frozen×{m.frozen_epochs}, " + stages
        batch = str(m.effective_batch)
        if m.memory is not None:
            batch = f"{m.effective_batch} = {m.memory.describe()}" if m.memory.accumulation_steps > 1 else batch
        elif m.problem and m.device == "cuda":
            batch += " [red](does not fit)[/]"
        flops = " → ".join(_si(m.flops[_text(s)]) or "[red]fails[/]" for s in dict.fromkeys(s for s, _ in m.stages))
        table.add_row(m.name, m.arch, stages, batch, _si(m.params), flops, _status(m), _time(m))
    console.print(table)
    if plan.folds:
        console.print(_fold_table(plan))
    for m in plan.members:
        if m.problem:
            console.print(f"[red]problem:[/] {escape(m.problem)}", highlight=False, soft_wrap=True)
    todo = plan.to_train
    kept = sum(m.weights_kept for m in plan.members)
    line = (f"{len(plan.members)} members: {len(plan.members) - len(todo) - kept} cached, "
            + (f"{kept} to predict (weights kept), " if kept else "") + f"{len(todo)} to train")
    if plan.folds:
        units = [u for m in plan.members for u in m.folds]
        line += (f" ({sum(not u.cached and not u.weights_kept for u in units)} of {len(units)} fold models to "
                 "train)")
    if todo:
        known = [m.est_seconds for m in todo if m.est_seconds is not None]
        if plan.est_seconds is not None:
            line += f"; estimated {_duration(plan.est_seconds)}"
        elif known:
            line += f"; estimated {_duration(sum(known))} for {len(known)} of them"
        if len(known) < len(todo) and plan.rate_entries == 0:
            line += f" (no estimate: nothing of {plan.competition.name} was trained on {plan.device} yet)"
        elif known:
            line += f" (from {plan.rate_entries} cached member{'s' * (plan.rate_entries > 1)} on {plan.device}, by FLOPs)"
    console.print(line, highlight=False)
