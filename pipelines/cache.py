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

from .config import Member
from .util import process_alive

FORMAT = 1  # bump when what an entry holds, or how a member is trained, changes meaning
ARRAYS = ("valid_plain", "valid_tta", "test_plain", "test_tta", "valid_targets", "valid_ids", "test_ids", "vocab")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def member_key(member: Member, data_fingerprint: str) -> str:
    """A hash of everything that changes the member's predictions, and nothing else: not its name, its weight in
    the average, its position in the list, or how many loader workers it uses."""
    fields = member.key_fields()
    if isinstance(member.pretrained, str):  # the weights' content counts, not where the file lies
        fields["pretrained"] = "sha256:" + _sha256(Path(member.pretrained).expanduser())
    blob = json.dumps({"format": FORMAT, "member": fields, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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


class DamagedEntry(Exception):
    pass


class MemberCache:
    """cache/<competition>/<key>/ for one competition."""

    def __init__(self, cache_root: Path, competition: str):
        self.root = cache_root / competition
        self.damaged: list[tuple[str, str]] = []  # (key, reason) of entries found damaged in this session

    def path(self, key: str) -> Path:
        return self.root / key

    def partial(self, key: str) -> Path:
        """Where an unfinished member keeps its per-epoch checkpoint (never read as an entry)."""
        return self.root / f".partial-{key}"

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

    def load(self, key: str) -> Entry | None:
        """The complete entry, or None when there is none; a damaged one is moved aside (kept for inspection)."""
        if not self.path(key).is_dir():
            return None
        try:
            return self._read(key)
        except (DamagedEntry, OSError, ValueError) as e:
            reason = str(e) or type(e).__name__
            self.damaged.append((key, reason))
            aside = self.root / ".damaged" / f"{key}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path(key), aside)
            return None

    def save(self, key: str, arrays: dict, meta: dict, extra_files: dict[str, Path] | None = None) -> Entry:
        """Write into a private temporary folder, then rename it into place: a run killed at any moment leaves
        either no entry or a complete one (plus a stray temporary folder, swept on the next run)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "probs.npz", **arrays)
        files = {"probs.npz": _sha256(tmp / "probs.npz")}
        for name, source in (extra_files or {}).items():
            shutil.move(str(source), tmp / name)
            files[name] = _sha256(tmp / name)
        meta = dict(meta, key=key, files=files)
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, self.path(key))
        except OSError:  # another run finished the same member first: its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        return self._read(key)

    def sweep(self) -> list[Path]:
        """Remove temporary folders left by runs that are no longer alive."""
        removed = []
        for tmp in self.root.glob(".tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def entries(self) -> list[dict]:
        """meta.json of every entry (unverified: listing must stay instant)."""
        out = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {"key": folder.name, "damaged": True}
            meta["bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            out.append(meta)
        return out
