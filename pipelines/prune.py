"""`ens cache prune`: what the cache holds that no run will read again, with its size, and its removal.

Leftovers: a member's `.partial-<train key>/` checkpoint once its entry or kept weights exist, or once no
ensemble YAML of the project trains that key (an edited or deleted member); `.damaged/` entries moved aside;
decoded and prepared copies no ensemble YAML's member reads (other data, size or settings); notebook datasets
older than the newest of their ensemble. With `entries`, also cache entries and kept weights no ensemble YAML
uses. What an ensemble YAML references is computed as `ens run` computes it (keys hash the data: a competition
whose data folder is not here keeps everything keyed). Nothing is removed while a running process holds its lock
(a member being trained or predicted, a copy being built).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import Project, load_ensemble
from .errors import ConfigError, EnsError
from .util import in_use_lock


@dataclass
class Leftover:
    path: Path
    bytes: int  # what deleting it frees: files linked elsewhere too (a notebook's weights) count nothing
    why: str
    lock: Path | None = None  # held while a run uses it
    in_use: bool = False  # that lock is held now: kept
    read_by_runs: bool = False  # a copy, entry or kept weights: deleted only while no ens run uses the cache


@dataclass
class _Refs:
    trains: set = field(default_factory=set)  # (competition, training key)
    keys: set = field(default_factory=set)  # (competition, prediction key)
    copies: set = field(default_factory=set)  # decoded and prepared folders
    unknown: dict = field(default_factory=dict)  # competition -> why its references are unknown


# this machine, a card with native bf16 and one without (fp16): every precision a member's key can hold
DEVICES = (None, {"cuda": True, "bf16": True}, {"cuda": True, "bf16": False})


def references(project: Project) -> _Refs:
    """Every training key, prediction key, decoded and prepared copy an ensemble YAML of the project uses."""
    from .cache import prediction_key, train_key
    from .device import assumed
    from .data import load_data, prepared_folder
    from .data.decoded import decoded_folder
    from .data.loaders import _hw
    from .run import member_data  # the driver gathers the teachers (pseudo-labels, distillation)
    from .unit import fold_variants

    refs, datas = _Refs(), {}
    for path in sorted(project.ensembles.rglob("*.yaml")) if project.ensembles.is_dir() else []:
        try:
            _, ens, comp = load_ensemble(project, str(path))
        except ConfigError as e:
            raise EnsError(f"{e}; prune keeps what every ensemble YAML uses, so each must load: fix it or move "
                           "it out of ensembles/") from None
        if comp.name in refs.unknown:
            continue
        if comp.name not in datas:
            if not comp.data_path(project).is_dir():
                refs.unknown[comp.name] = f"its data folder {project.relative(comp.data_path(project))} is missing"
                continue
            try:
                datas[comp.name] = load_data(project, comp)
            except EnsError as e:
                refs.unknown[comp.name] = str(e)
                continue
        variants, _ = fold_variants(ens, datas[comp.name], None, project.relative(path))
        for member in ens.members:
            for fold, data, _ in variants:
                try:
                    data = member_data(project, member, data, fold)
                except EnsError:  # its teacher is not cached: nothing of this unit can be in the cache either
                    continue
                # the member's keys as trained here and on any GPU (a Kaggle notebook, `--on kaggle`, another
                # machine sharing the cache): precision resolves differently there, and so do the keys
                for facts in DEVICES:
                    with assumed(facts):
                        train = train_key(member, data.fingerprint)
                        refs.trains.add((comp.name, train))
                        refs.keys.add((comp.name, prediction_key(train, member)))
                if member.prepare:
                    refs.copies.add(prepared_folder(data, member.prepare, project.cache))
                    data = replace(data, root=prepared_folder(data, member.prepare, project.cache))
                sizes = [_hw(member.final_size)] if member.classical else member.presizes if member.decode else []
                refs.copies.update(decoded_folder(data, hw) for hw in sizes)
    return refs


def find_leftovers(project: Project, entries: bool = False) -> tuple[list[Leftover], list[str]]:
    """(the leftovers, notes on what was kept for want of knowing), each leftover marked `in_use` when a running
    process holds its lock."""
    refs = references(project)
    found: list[Leftover] = []
    competitions = sorted(p.name for p in project.cache.iterdir() if p.is_dir()
                          and (project.competitions / f"{p.name}.yaml").exists()) if project.cache.is_dir() else []
    for name in competitions:
        found += _in_competition(project, name, refs, entries)
    for kind in ("decoded", "prepared"):
        for folder in sorted((project.cache / kind).glob("*/*")):
            comp = folder.parent.name
            if folder.name.startswith(".") or ".building-" in folder.name or not folder.is_dir():
                continue
            if comp not in refs.unknown and folder not in refs.copies:
                found.append(Leftover(folder, 0, f"a {kind} copy no ensemble YAML's member reads",
                                      folder.parent / f".{folder.name}.lock", read_by_runs=True))
    busy = _held(in_use_lock(project.cache))  # a run of a YAML elsewhere, or with overrides, reads what no YAML names
    for item in found:
        item.bytes = _freed(item.path)
        item.in_use = _held(item.lock) or (item.read_by_runs and busy)
    notes = [f"{name}: {why}; its partial checkpoints and copies are kept (what its ensembles use is unknown)"
             for name, why in refs.unknown.items()]
    return found, notes


def _in_competition(project: Project, name: str, refs: _Refs, entries: bool) -> list[Leftover]:
    from .cache import MemberCache

    cache = MemberCache(project.cache, name)
    known = name not in refs.unknown
    metas = cache.entries()
    have = {m.get("train_key") for m in metas} | {p.name for p in (cache.root / "models").glob("*") if p.is_dir()}
    out = []
    for partial in sorted(cache.root.glob(".partial-*")):
        train = partial.name.removeprefix(".partial-")
        if train in have:
            out.append(Leftover(partial, 0, "an interrupted training whose entry or weights exist", cache.lock(train)))
        elif known and (name, train) not in refs.trains:
            out.append(Leftover(partial, 0, "an interrupted training no ensemble YAML needs (an edited or deleted "
                                            "member)", cache.lock(train)))
    out += [Leftover(p, 0, "a damaged entry moved aside") for p in sorted((cache.root / ".damaged").glob("*"))]
    out += _old_notebooks(cache.root / "notebook")
    if entries and known:
        out += [Leftover(cache.path(m["key"]), 0, "an entry no ensemble YAML uses",
                         cache.lock(m["train_key"]) if m.get("train_key") else None, read_by_runs=True)
                for m in metas if (name, m["key"]) not in refs.keys]
        out += [Leftover(p, 0, "kept weights no ensemble YAML uses", cache.lock(p.name), read_by_runs=True)
                for p in sorted((cache.root / "models").glob("*"))
                if p.is_dir() and not p.name.startswith(".") and (name, p.name) not in refs.trains]
    return out


def _old_notebooks(parent: Path) -> list[Leftover]:
    """The notebook datasets of each ensemble but its newest (one push replaces the previous)."""
    by_ensemble: dict[str, list[tuple[float, Path]]] = {}
    for manifest in parent.glob("*/dataset/manifest.json"):
        try:
            ensemble = json.loads(manifest.read_text()).get("ensemble", "")
        except (OSError, ValueError):
            continue
        by_ensemble.setdefault(ensemble, []).append((manifest.stat().st_mtime, manifest.parent.parent))
    return [Leftover(folder, 0, f"an older notebook dataset of {ensemble}")
            for ensemble, folders in sorted(by_ensemble.items()) for _, folder in sorted(folders)[:-1]]


def _freed(path: Path) -> int:
    """The bytes deleting `path` frees: its files' sizes, but for files linked from elsewhere too."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size if st.st_nlink == 1 else 0
    return total


@contextmanager
def _locked(lock: Path | None):
    """Hold `lock` (created if missing) for the block when no other process does: yields False when one does."""
    import fcntl

    if lock is None:
        yield True
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _held(lock: Path | None) -> bool:
    if lock is None or not lock.exists():
        return False
    with _locked(lock) as free:
        return not free


def prune(found: list[Leftover], cache_root: Path) -> list[Leftover]:
    """Delete the leftovers no running process holds, each under its lock (copies, entries and kept weights also
    under the cache's in-use lock, held exclusively: no run is reading them); the ones deleted."""
    removed = []
    with _locked(in_use_lock(cache_root)) as idle:
        for item in found:
            with _locked(item.lock) as free:
                if not free or (item.read_by_runs and not idle):
                    item.in_use = True
                    continue
                shutil.rmtree(item.path, ignore_errors=True)
                if not item.path.exists():
                    removed.append(item)
    return removed
