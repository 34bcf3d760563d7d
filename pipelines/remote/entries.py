"""What comes back from a training notebook, verified before it enters the cache: the archive's checksum as the
notebook recorded it, the key the entry claims equal to the key the local plan expects, the probabilities' and
weights' checksums in their meta, every array present. Moved in atomically, under the training key's lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..cache import ARRAYS, MODEL, MemberCache
from ..errors import EnsError
from ..util import file_lock, owner_tag


class Refused(EnsError):
    pass


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(folder: Path, train: str, key: str) -> None:
    """Refuse (one line) an extracted unit whose entry or weights are not what the plan expects."""
    try:
        meta = json.loads((folder / "entry" / "meta.json").read_text())
    except (OSError, ValueError):
        raise Refused("its meta.json is missing or not JSON") from None
    if meta.get("key") != key:
        raise Refused(f"it claims key {meta.get('key')}, the plan here expects {key}")
    if meta.get("train_key") != train:
        raise Refused(f"it claims training key {meta.get('train_key')}, the plan here expects {train}")
    probs = folder / "entry" / "probs.npz"
    if not probs.is_file() or _sha256(probs) != (meta.get("files") or {}).get("probs.npz"):
        raise Refused("probs.npz does not match the checksum in its meta.json")
    try:
        with np.load(probs, allow_pickle=False) as z:
            lacking = [a for a in ARRAYS if a not in z.files]
    except (OSError, ValueError) as e:
        raise Refused(f"probs.npz cannot be read ({e})") from None
    if lacking:
        raise Refused(f"probs.npz lacks {', '.join(lacking)}")
    model = folder / "model"
    if model.is_dir():
        try:
            mmeta = json.loads((model / "meta.json").read_text())
        except (OSError, ValueError):
            raise Refused("its kept weights' meta.json is missing or not JSON") from None
        if mmeta.get("train_key") != train:
            raise Refused(f"its kept weights claim training key {mmeta.get('train_key')}, the plan expects {train}")
        if not (model / MODEL).is_file() or _sha256(model / MODEL) != (mmeta.get("files") or {}).get(MODEL):
            raise Refused(f"{MODEL} does not match the checksum in its meta.json")


def import_unit(cache: MemberCache, archive: Path, sha256: str | None, train: str, key: str) -> None:
    """Verify the unit's archive and move its entry (and weights) into the cache; Refused when it fails."""
    from ..kaggle import KaggleError, safe_extract

    if sha256 and _sha256(archive) != sha256:
        raise Refused(f"{archive.name} does not match the checksum the notebook recorded (damaged in transfer?)")
    tmp = cache.root / f".tmp-import-{key}-{owner_tag()}"
    try:
        try:
            safe_extract(archive, tmp)
        except (KaggleError, OSError, ValueError) as e:
            raise Refused(f"{archive.name} is not a safe archive ({e})") from None
        verify(tmp, train, key)
        with file_lock(cache.lock(train)):
            if (tmp / "model").is_dir() and not cache.model_dir(train).is_dir():
                cache.model_dir(train).parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp / "model", cache.model_dir(train))
            if not cache.path(key).is_dir():
                os.rename(tmp / "entry", cache.path(key))
            shutil.rmtree(cache.partial(train), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_partial(cache: MemberCache, archive: Path, train: str) -> bool:
    """A unit stopped by a notebook's limit: its last epoch's checkpoint as `.partial-<train>/` here, which the
    next notebook is given (or a local run resumes from). Not when an entry or weights exist already."""
    from ..kaggle import KaggleError, safe_extract

    if cache.model_dir(train).is_dir():
        return False
    try:
        with file_lock(cache.lock(train)):
            safe_extract(archive, cache.partial(train))
    except (KaggleError, OSError):
        return False
    return True
