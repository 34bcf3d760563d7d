"""A downloaded archive unpacked safely (no entry outside the folder, no links, no device files) into a partial
folder renamed into place; leftovers of dead processes swept."""

from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import KaggleError
from ..util import owner_tag, sweep_dead

_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


_PARTIAL = ".partial-"    # marks temporary siblings: .<name>.partial-<pid>-<random>


def safe_extract(zip_path: Path, dest: Path) -> Path:
    """Extract `zip_path` into `dest` (replacing it) or refuse the whole archive.

    Every entry is checked before anything is written: an absolute path, a drive letter, a `..` component, a
    symlink or a special file (device, fifo) rejects the archive with a KaggleError and nothing is extracted.
    Extraction goes to a temporary sibling renamed into place at the end, so `dest` is never half-extracted."""
    return _extract(Path(zip_path), Path(dest), str(zip_path))


def _extract(zip_path: Path, dest: Path, label: str) -> Path:
    """safe_extract, naming the archive `label` in errors."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise KaggleError(f"{label} is not a readable zip archive ({type(e).__name__}); download it again",
                          "bad zip archive") from None
    with archive:
        for info in archive.infolist():
            problem = _unsafe_entry(info)
            if problem:
                raise KaggleError(f"{label}: entry '{info.filename}' {problem}; the archive was rejected and "
                                  f"nothing was extracted into {dest} (download the data from the competition's page)",
                                  f"unsafe archive entry '{info.filename}': {problem}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _sweep_partials(dest)
        tmp = _partial_path(dest, "unzip")
        try:
            tmp.mkdir()
            root = tmp.resolve()
            for info in archive.infolist():
                target = root.joinpath(*_parts(info.filename))
                if not target.resolve().is_relative_to(root):  # belt and braces after _unsafe_entry
                    raise KaggleError(f"{label}: entry '{info.filename}' would land outside {dest}; the archive "
                                      "was rejected", f"unsafe archive entry '{info.filename}'")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            _replace_dir(tmp, dest)
        except KaggleError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:  # disk full, corrupt member, CRC error
            shutil.rmtree(tmp, ignore_errors=True)
            detail = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
            raise KaggleError(f"{label}: extraction failed ({detail}); {dest} was left as it was: free disk space "
                              "or download again", f"extraction failed: {detail}") from None
    return dest


def _check_slug(slug: str) -> None:
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise KaggleError(f"'{slug}' is not a Kaggle competition slug: use the part after /competitions/ in the "
                          "competition's URL, e.g. paddy-disease-classification", "bad slug")


def _partial_path(dest: Path, what: str) -> Path:
    return dest.parent / f".{dest.name}{_PARTIAL}{what}-{owner_tag()}"


def _sweep_partials(dest: Path) -> None:
    """Remove the temporary siblings of `dest` left by processes of this host that no longer run."""
    sweep_dead(dest.parent, [f".{glob.escape(dest.name)}{_PARTIAL}*-{{owner}}"])


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        old = _partial_path(dest, "old")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _unsafe_entry(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is a special file"
    unified = name.replace("\\", "/")
    if "\x00" in name:
        return "has a NUL byte in its name"
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified) or PurePosixPath(unified).is_absolute():
        return "has an absolute path that would land outside the destination"
    if ".." in unified.split("/"):
        return "has a '..' component that would land outside the destination"
    if not _parts(name):
        return "has an empty name"
    return None


def _dir_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
