"""A member's parameters and FLOPs (counted once, memoised) and the time estimate fitted on cached members'
rates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..cache import MemberCache
from ..config import is_classical
from ..data.decoded import decoded_bytes  # noqa: F401 - the plan prints it (tests import it from here)
from ..memory import _size_text
from ..models import package_version
from ..util import user_cache, write_json


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
    return user_cache() / f"flops2-{versions}.json"  # 2: counted on the meta device (attention included)


def count_flops(model, size, device: str = "cpu") -> int:
    """Forward FLOPs of one image at `size` (torch's FlopCounterMode: 2 per multiply-add). On the "meta" device
    (a model built there) only shapes are computed: the same count, without the arithmetic."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    h, w = _hw(size)
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, h, w, device=device))
    return int(counter.get_total_flops())


def _build_stats_model(build: Callable, arch: str, n_classes: int, final_size, device: str):
    """`build(arch, n_classes, final_size)` with its parameters on `device`: "meta" allocates and initialises
    nothing (a 50 M-parameter ConvNeXt builds in a third of the time, and counts its FLOPs without computing)."""
    import torch

    with torch.device(device):
        return build(arch, n_classes, final_size)


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
        self._shared: dict = {}  # (arch, classes) -> params and FLOPs per size, for networks that took no size

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
            self._count(arch, n_classes, final_size, entry, missing)
            self.dirty = True
        return entry["params"], {_text(s): entry["flops"][_text(s)] for s in sizes}

    def _count(self, arch: str, n_classes: int, final_size, entry: dict, missing: list) -> None:
        """Params and the `missing` sizes' FLOPs into `entry`: on a network built on the meta device, else (an
        op without a meta kernel, or an error to report as the CPU gives it) on the CPU. A network that took no
        size argument (a convnet: `models.with_size_kwargs`) is built and counted once per size for all the
        members of its arch, whatever their final sizes."""
        build = self._build
        if build is None:
            from ..models import build_model as build
        models: dict = {}

        def model(device):
            if device not in models:
                models[device] = _build_stats_model(build, arch, n_classes, final_size, device)
                self.built += 1
            return models[device]

        shared = self._shared.get((arch, n_classes))
        if shared is None:
            try:
                meta = model("meta")
            except Exception:  # noqa: BLE001 - a constructor that computes on its weights: the CPU it is
                meta = models["meta"] = model("cpu")
            shared = {"params": sum(p.numel() for p in meta.parameters()), "flops": {}}
            if "img_size" not in getattr(meta, "ens_size_kwargs", {"img_size": None}):  # size-free: share it
                self._shared[(arch, n_classes)] = shared
        else:
            models["meta"] = shared["model"]  # built for another final size: the same network
        shared["model"] = models["meta"]
        entry["params"] = shared["params"]
        for s in missing:
            flops = shared["flops"].get(_text(s))
            if flops is None:
                try:
                    flops = count_flops(model("meta"), s, "meta")
                except Exception:  # noqa: BLE001 - the CPU decides, and words the error
                    try:
                        flops = count_flops(model("cpu"), s)
                    except RuntimeError as e:  # e.g. a size too small for the arch's downsampling
                        entry["errors"][_text(s)] = str(e).splitlines()[0][:200]
                if flops is not None:
                    shared["flops"][_text(s)] = flops
            entry["flops"][_text(s)] = flops

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


class MemoryPlans:
    """Memory plans (`memory.plan_member` on CUDA) memoised per (arch, classes, probe size, precision, budget, batch,
    min_micro_batch) and card, with the library versions in the file name: the probes (a model built on the card,
    up to 7 pairs of training steps per member) are most of a first `ens plan` on a GPU. Only plans the budget
    bounded are kept, not ones the card's free memory at that moment bounded (another process on it): those are
    not facts of the arch and the budget. Training probes again, for real, whatever this memo holds."""

    def __init__(self, path: Path, card: Optional[str]):
        self.path, self.card = path, card
        try:
            self.table = json.loads(path.read_text()) if card else {}
        except (OSError, ValueError):
            self.table = {}
        self.dirty = False

    def _key(self, member, n_classes: int, precision: str, budget: int) -> str:
        from ..memory import probe_size

        return json.dumps([member.arch, n_classes, probe_size(member), precision, budget, member.batch_size,
                           member.min_micro_batch, self.card])

    def plan(self, member, n_classes: int, precision: str, make: Callable):
        """The member's MicroBatchPlan from the memo, else `make()` (memoised when the budget bounded it)."""
        from dataclasses import asdict

        from ..config import parse_bytes
        from ..memory import SAFETY_MARGIN, MicroBatchPlan, probe_size

        budget = parse_bytes(member.gpu_memory)
        key = self._key(member, n_classes, precision, budget)
        if self.card and key in self.table:
            fields = dict(self.table[key], probes=tuple(tuple(p) for p in self.table[key]["probes"]))
            return MicroBatchPlan(**fields, member=member.name, size=probe_size(member))
        plan = make()
        if self.card and plan.limit_bytes in (None, budget - SAFETY_MARGIN):
            kept = {k: v for k, v in asdict(plan).items() if k not in ("member", "size", "oom_restarts", "oom_errors")}
            self.table[key], self.dirty = kept, True
        return plan

    def save(self) -> None:
        if self.dirty:
            try:  # merge with what another process may have written meanwhile
                on_disk = json.loads(self.path.read_text())
            except (OSError, ValueError):
                on_disk = {}
            write_json(self.path, {**on_disk, **self.table}, indent=0, sort_keys=True)
            self.dirty = False


def memory_memo_path(flops_memo: Optional[Path] = None) -> Path:
    """Beside the FLOP memo (a test's own, or ~/.cache/ens's), with the same library versions."""
    flops = flops_memo or flops_memo_path()
    return flops.with_name(flops.name.replace("flops2-", "memory-") if flops_memo is None else f"memory-{flops.name}")


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
            counted = meta.get("images") or {}  # written since ens 27: the entry's own counts
            n_train, n_pred = (counted["train"], counted["predicted"]) if counted else images(meta.get("cv"))
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


# The speed assumed where nothing was measured on the device yet, in any competition of the project: seconds per
# image·GFLOP (forward FLOPs) of training (forward and backward, the optimizer, the loaders) and of prediction.
# Orders of magnitude for real networks (a ResNet-50 at 4 GFLOP trains at a few images a second on a few CPU cores:
# ~0.05 s; ens's tiny test nets on 32 px digits, overhead-bound, measure 0.5-3 s on 2 cores); a
# data-centre GPU in mixed precision at ~1e-4 s. Any model trained since replaces them.
BUILTIN_RATES = {"cpu": (0.05, 0.015), "cuda": (1e-4, 3e-5)}


def other_rates(cache_root: Path, competition: str, device: str, stats: ModelStats, n_classes: int) -> dict:
    """{competition: its rates} of the project's other competitions' cached models trained on `device` (those
    whose meta records their image counts)."""
    out = {}
    for folder in sorted(cache_root.iterdir()) if cache_root.is_dir() else []:
        if folder.name == competition or folder.name in ("data", "decoded", "prepared", "fingerprints") \
                or not folder.is_dir():
            continue
        cache = MemberCache(cache_root, folder.name)
        rates = _rates(cache, device, stats, n_classes, _no_counts)
        if rates:
            out[folder.name] = rates
    return out


def _no_counts(cv):
    raise KeyError("images")  # another competition's entry without its image counts (older): skipped


def estimate(rates: list[_Rate], others: dict, device: str, arch: str, train_work: float,
             predict_work: float) -> tuple[float, float, str, bool] | None:
    """(train seconds, predict seconds, what the rate is from, approximate): from this competition's cached
    models (`_estimate`); else from the other competitions' (the same arch first), scaled by FLOPs; else from the
    built-in rate of the device. Approximate (shown with `~`) unless measured on this competition."""
    own = _estimate(rates, arch, train_work, predict_work)
    if own:
        return (*own, False)
    pool = [r for rs in others.values() for r in rs]
    if pool:
        train, predict, _ = _estimate(pool, arch, train_work, predict_work)
        same = [r for r in pool if r.arch == arch]
        n = len(same or pool)
        what = f"{n} cached {arch} model{'s' * (n > 1)}" if same else f"{n} cached model{'s' * (n > 1)}"
        return train, predict, f"{what} of {', '.join(others)}", True
    if device in BUILTIN_RATES:
        t, p = BUILTIN_RATES[device]
        return t * train_work, p * predict_work, f"the built-in rate for {device}", True
    return None


def _estimate(rates: list[_Rate], arch: str, train_work: float, predict_work: float) -> tuple[float, float, str] | None:
    same = [r for r in rates if r.arch == arch]
    pool = same or rates
    if not pool:
        return None
    train_rate = sum(r.train_seconds for r in pool) / sum(r.train_work for r in pool)
    predict_rate = sum(r.predict_seconds for r in pool) / sum(r.predict_work for r in pool)
    basis = f"{arch}, {len(same)} cached" if same else f"{len(pool)} cached member{'s' * (len(pool) > 1)}"
    return train_rate * train_work, predict_rate * predict_work, basis
