"""What every config model shares: the strict base model, the project folder, sizes and memory amounts,
and the constants that name how pixels are made and TTA draws are seeded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, WrapValidator

from ..errors import ConfigError

PROJECT_ENV = "ENS_PROJECT"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- the project folder
class Project:
    """The folder `ens` works on: competitions/, ensembles/, submissions/, cache/."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.competitions = self.root / "competitions"
        self.ensembles = self.root / "ensembles"
        self.submissions = self.root / "submissions"
        self.cache = self.root / "cache"

    @classmethod
    def find(cls, root: Optional[Path] = None) -> "Project":
        """`root`, else $ENS_PROJECT, else the nearest folder upwards from the current one holding competitions/."""
        if root is None and os.environ.get(PROJECT_ENV):
            root = Path(os.environ[PROJECT_ENV])
        if root is not None:
            if not (root / "competitions").is_dir():
                raise ConfigError(f"{root}: no competitions/ folder here; point --project (or ${PROJECT_ENV}) "
                                  "at an ens project folder")
            return cls(root)
        here = Path.cwd().resolve()
        for folder in (here, *here.parents):
            if (folder / "competitions").is_dir():
                return cls(folder)
        raise ConfigError(f"{here}: not inside an ens project (no competitions/ folder found upwards); "
                          f"cd into one or pass --project DIR (or set ${PROJECT_ENV})")

    @staticmethod
    def shown(path: Path) -> str:
        """`path` as it can be typed from the current folder: relative to it when inside it, else absolute (what
        a verb prints for the user to pass on; `relative` names a project file in messages and records)."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(Path.cwd().resolve()))
        except (ValueError, OSError):
            return str(path)

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)



_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """'8GiB', '7.5 GB', '8000MiB' → bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise ValueError(f"'{text}' is not a memory size; write e.g. 8GiB or 7.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])



def _size(value, handler):
    """A size: a positive int, or [height, width] of positive ints (checked here: PIL or torch would fail with a
    traceback mid-run, after the time is spent)."""
    bad = ValueError("a size is a positive number of pixels, an int or [height, width] of ints (e.g. 224 or "
                     "[224, 288]); fix the value")
    if isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)):
        raise bad
    try:
        size = handler(value)
    except ValidationError:
        raise bad from None
    if min(size if isinstance(size, tuple) else (size,)) < 1:
        raise bad
    return size


Size = Annotated[Union[int, tuple[int, int]], WrapValidator(_size)]


TTA_SEEDING = "per-split"

CLASSICAL = "classical:"  # an arch of hand-made features and a scikit-learn classifier (`classical.py`)


def is_classical(arch: str) -> bool:
    return arch.startswith(CLASSICAL)


# how an image file becomes a member's pixels (`data.decoded.load_item`): a change that changes pixels changes this,
# and so every cache key and decoded copy
PIXELS = "pil-draft-bilinear-1"


def _square(size):
    """224 for 224 and for [224, 224]; [h, w] otherwise."""
    if isinstance(size, (tuple, list)):
        return size[0] if size[0] == size[1] else [size[0], size[1]]
    return size

