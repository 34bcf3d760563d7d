"""Member key → a directory of artefacts: probabilities with their ids and vocab, metrics, timings, the resolved
config and library versions. Written atomically; a damaged entry is detected, reported, moved aside, recomputed.

Knows nothing of fastai: `ens cache ls` and ablation read it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TTA_SEEDING, Member
from .errors import disk_full, disk_full_error
from .util import owner_tag, sweep_dead

# bump when what an entry holds, or how a member is trained, changes meaning. 2: keys canonical (equivalent
# configs share one), training and prediction keys split, weights kept, TTA seeded, stage size governs without
# augmentation, fine-tuning unfreezes with freeze_epochs 0
FORMAT = 2
ARRAYS = ("valid_plain", "valid_tta", "test_plain", "test_tta", "valid_targets", "valid_ids", "test_ids", "vocab")
WARN_VERSIONS = ("torch", "timm", "fastai")  # a cached entry made with another major.minor of these is flagged


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def train_key(member: Member, data_fingerprint: str) -> str:
    """A hash of everything that changes the member's trained weights, canonical (`Member.train_fields`), and
    nothing else: not its name, its weight in the average, its position, its loader workers or its TTA. The
    architecture is resolved (timm aliases, and the default pretrained tag and weight source of an untagged
    name), the precision is what it resolves to on this machine, a weights file counts by its content."""
    return _hash(train_key_fields(member, data_fingerprint))


def train_key_fields(member: Member, data_fingerprint: str) -> dict:
    """What `train_key` hashes: where two machines' keys differ, these say why (data, precision, arch, ...)."""
    from .device import key_precision
    from .models import resolved_arch

    fields = member.train_fields()
    fields["arch"] = resolved_arch(member.arch, member.pretrained)
    fields["precision"] = key_precision(member.precision)
    if isinstance(member.pretrained, str):  # the weights' content counts, not where the file lies
        fields["pretrained"] = "sha256:" + _sha256(Path(member.pretrained).expanduser())
    return {"format": FORMAT, "member": fields, "data": data_fingerprint}


def prediction_key(train: str, member: Member) -> str:
    """The cache entry of `member`'s probabilities: its training key and its TTA."""
    return _hash({"format": FORMAT, "train": train, "tta": member.tta_fields()})


def member_key(member: Member, data_fingerprint: str) -> str:
    """The key of the member's cache entry (its probabilities): `prediction_key(train_key(...))`."""
    return prediction_key(train_key(member, data_fingerprint), member)


def version_drift(meta: dict) -> list[str]:
    """'torch 2.4 → 2.14' for each library in WARN_VERSIONS whose major.minor differs from the one that made
    the entry (its probabilities stay valid, but a retrain would not reproduce them exactly)."""
    from .models import package_version

    out = []
    for name in WARN_VERSIONS:
        then, now = (meta.get("versions") or {}).get(name), package_version(name)
        if then and now != "none" and then.split(".")[:2] != now.split(".")[:2]:
            out.append(f"{name} {then} → {now}")
    return out


@dataclass
class Entry:
    key: str
    path: Path
    meta: dict
    arrays: dict

    @property
    def vocab(self) -> list[str]:
        return [str(v) for v in self.arrays["vocab"]]

    def probs(self, split: str, kind: str) -> np.ndarray:
        return self.arrays[f"{split}_{kind}"]

    @property
    def train_key(self) -> str | None:
        return self.meta.get("train_key")

    @property
    def model_path(self) -> Path | None:
        """The kept weights these probabilities were predicted with, where they were kept."""
        path = self.path.parent / "models" / str(self.train_key) / MODEL
        return path if self.train_key and path.is_file() else None

    @property
    def model_sha256(self) -> str:
        """The kept weights' checksum, as `save_model` recorded it (hashing gigabytes again is not needed; a
        checksum-less older file is hashed)."""
        try:
            return json.loads((self.model_path.parent / "meta.json").read_text())["files"][MODEL]
        except (OSError, ValueError, KeyError):
            return _sha256(self.model_path)


MODEL = "model.pth"


class DamagedEntry(Exception):
    pass


def torch_save(obj, path: Path) -> None:
    """`torch.save` into `path` through a Python file, so that a full disk is the OSError (ENOSPC) the disk-full
    handlers catch. Given a path, torch writes itself and says only "enforce fail at inline_container.cc" (a
    RuntimeError); given a file, the file's OSError is raised, or is the context of that RuntimeError (torch
    closes its archive on the way out): raised as itself."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:
        cause = e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None


def tta_blend(aug: np.ndarray, plain: np.ndarray, beta: float) -> np.ndarray:
    """fastai's `lerp(aug, plain, beta)`, computed by ens alone so that a blend derived later for another beta
    from the kept arrays equals one made at prediction time."""
    aug, plain = aug.astype("float64"), plain.astype("float64")
    return (aug + beta * (plain - aug)).astype("float32")


def tta_probs_of(arrays: dict, split: str, beta: float, passes: int, views: list[str]) -> np.ndarray:
    """The TTA probabilities of `split` from an entry's arrays: the augmented passes' mean blended with the plain
    pass by `beta` (the plain pass alone without passes), averaged with each named view's (`TTA.views`)."""
    base = tta_blend(arrays[f"{split}_aug"], arrays[f"{split}_plain"], beta) if passes else arrays[f"{split}_plain"]
    if not views:
        return base
    stacked = np.stack([base, *(arrays[f"{split}_view_{v}"] for v in views)]).astype("float64")
    return stacked.mean(0).astype("float32")


class MemberCache:
    """cache/<competition>/ for one competition:
    <key>/               an entry: probabilities (probs.npz) and meta.json, keyed by the prediction key;
    models/<train key>/  the kept weights (model.pth) and their meta.json, keyed by the training key;
    .partial-<train key>/ the per-epoch checkpoint of a member being trained;
    notebook/<content>/  a code competition's dataset (`notebook.bundle`), not an entry;
    remote/<content>/    a training notebook's dataset and kernel, remote/out/ its fetched output (`remote/`);
    .locks/<train key>.lock  held while a member is trained or predicted, so two runs never do it twice at once."""

    def __init__(self, cache_root: Path, competition: str):
        self.root = cache_root / competition
        self.damaged: list[tuple[str, str]] = []  # (key, reason) of entries found damaged in this session

    def path(self, key: str) -> Path:
        return self.root / key

    def partial(self, train: str) -> Path:
        """Where an unfinished member keeps its per-epoch checkpoint (never read as an entry)."""
        return self.root / f".partial-{train}"

    def lock(self, train: str) -> Path:
        return self.root / ".locks" / f"{train}.lock"

    def model_dir(self, train: str) -> Path:
        return self.root / "models" / train

    def model_file(self, train: str) -> Path:
        return self.model_dir(train) / MODEL

    def _read(self, key: str) -> Entry:
        folder = self.path(key)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except FileNotFoundError:
            raise DamagedEntry("meta.json is missing") from None
        except ValueError:
            raise DamagedEntry("meta.json is not valid JSON") from None
        probs = folder / "probs.npz"
        if not probs.is_file():
            raise DamagedEntry("probs.npz is missing")
        if _sha256(probs) != meta.get("files", {}).get("probs.npz"):
            raise DamagedEntry("probs.npz does not match its checksum")
        with np.load(probs, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        missing = [a for a in ARRAYS if a not in arrays]
        if missing:
            raise DamagedEntry(f"probs.npz lacks {', '.join(missing)}")
        return Entry(key, folder, meta, arrays)

    def _move_aside(self, folder: Path, key: str, reason: str) -> None:
        self.damaged.append((key, reason))
        aside = self.root / ".damaged" / f"{folder.name}-{int(time.time())}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, aside)

    def load(self, key: str) -> Entry | None:
        """The complete entry, or None when there is none; a damaged one is moved aside (kept for inspection)."""
        if not self.path(key).is_dir():
            return None
        try:
            return self._read(key)
        except (DamagedEntry, OSError, ValueError) as e:
            self._move_aside(self.path(key), key, str(e) or type(e).__name__)
            return None

    def _write_dir(self, dest: Path, write, what: str) -> None:
        """`write(tmp)` fills a private temporary folder that is then renamed to `dest`: a run killed at any moment
        leaves either nothing or a complete folder (plus a stray temporary one, swept on the next run). A full disk
        leaves nothing either, and says so in one line."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{dest.name}-{owner_tag()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full(e):
                raise disk_full_error(dest.parent, what) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, dest)
        except OSError:  # another run finished the same thing first: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self, key: str, arrays: dict, meta: dict) -> Entry:
        """Write an entry atomically (see `_write_dir`) and read it back, checked."""

        def write(tmp: Path) -> None:
            np.savez(tmp / "probs.npz", **arrays)
            _write_json(tmp / "meta.json", dict(meta, key=key, files={"probs.npz": _sha256(tmp / "probs.npz")}))

        self._write_dir(self.path(key), write, f"the cache entry {key}")
        return self._read(key)

    # ------------------------------------------------------------------------------------------- kept weights
    def save_model(self, train: str, state_dict, meta: dict) -> Path:
        """Keep a trained member's weights (and how to rebuild it) under models/<train key>/."""

        def write(tmp: Path) -> None:
            torch_save(state_dict, tmp / MODEL)
            _write_json(tmp / "meta.json", dict(meta, train_key=train, files={MODEL: _sha256(tmp / MODEL)}))

        self._write_dir(self.model_dir(train), write, f"the weights of {train}")
        return self.model_file(train)

    def model_meta(self, train: str, verify: bool = True) -> dict | None:
        """The meta.json of kept weights (checked against model.pth's checksum with `verify`), or None; damaged
        weights are moved aside."""
        folder = self.model_dir(train)
        if not folder.is_dir():
            return None
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if verify and _sha256(folder / MODEL) != meta["files"][MODEL]:
                raise DamagedEntry(f"{MODEL} does not match its checksum")
            return meta
        except (DamagedEntry, OSError, ValueError, KeyError) as e:
            self._move_aside(folder, f"models/{train}", str(e) or type(e).__name__)
            return None

    def tta_sibling(self, train: str, passes: int, views: list[str] = ()) -> Entry | None:
        """An entry of the same weights whose TTA made the same augmented passes and at least `views` (another
        beta, or fewer views, say): its arrays give that blend without predicting again."""
        for meta in self.entries():
            tta = (meta.get("key_fields") or {}).get("tta", {})
            if (meta.get("train_key") == train and tta.get("n") == passes and set(views) <= set(tta.get("views", []))
                    and tta.get("seeding") == (TTA_SEEDING if passes else None)):
                entry = self.load(meta["key"])
                if entry is not None and (not passes or "valid_aug" in entry.arrays):
                    return entry
        return None

    def sweep(self) -> list[Path]:
        """Remove temporary folders and files left by runs that are no longer alive."""
        removed = sweep_dead(self.root, [".tmp-*-{owner}"]) + sweep_dead(self.root / "models", [".tmp-*-{owner}"])
        # weights of cache format 1, written under a name without a pid: stale once an hour old (format 2 writes
        # weights through a temporary folder, swept above)
        for old in self.root.glob(".model-*.pth") if self.root.is_dir() else ():
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
                removed.append(old)
        return removed

    def entries(self) -> list[dict]:
        """meta.json of every entry (unverified: listing must stay instant)."""
        out = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if folder.name.startswith(".") or folder.name in ("models", "notebook", "remote") or not folder.is_dir():
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {"key": folder.name, "damaged": True}
            meta["bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            weights = self.root / "models" / str(meta.get("train_key"))  # kept weights (shared by its TTA variants)
            meta["weights_bytes"] = sum(f.stat().st_size for f in weights.iterdir() if f.is_file()) \
                if meta.get("train_key") and weights.is_dir() else 0
            out.append(meta)
        return out


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
