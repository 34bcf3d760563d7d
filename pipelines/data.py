"""A competition's files on disk: the embedded digits build, the layout (class folders or a labels CSV), the fixed
validation split, a content fingerprint, and fastai DataLoaders at a size.

fastai is imported only inside `dataloaders`: listing and fingerprinting stay cheap.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .config import Competition, Project
from .errors import ConfigError, EnsError


@dataclass(frozen=True)
class CompetitionData:
    """Everything a member needs to know about the images, as paths relative to `root`."""

    competition: Competition
    root: Path
    train_paths: list[str]
    train_labels: list[str]
    is_valid: list[bool]
    test_paths: list[str]
    fingerprint: str

    @property
    def vocab(self) -> list[str]:
        return sorted(set(self.train_labels))

    @property
    def valid_paths(self) -> list[str]:
        return [p for p, v in zip(self.train_paths, self.is_valid) if v]

    @property
    def valid_labels(self) -> list[str]:
        return [l for l, v in zip(self.train_labels, self.is_valid) if v]

    @property
    def test_ids(self) -> list[str]:
        stem = self.competition.test_id == "stem"
        return [Path(p).stem if stem else Path(p).name for p in self.test_paths]


# --------------------------------------------------------------------------------------------- the digits build
def build_digits(dest: Path, test_fraction: float = 0.2) -> None:
    """scikit-learn's 1797 bundled 8x8 digits as 32x32 RGB PNGs in a Kaggle-like layout; answers in solution.csv.

    Deterministic (a fixed legacy RandomState, which numpy keeps stable); built in a temporary folder and renamed,
    so an interrupted build never looks complete.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    n_test = int(round(len(order) * test_fraction))
    tmp = dest.with_name(dest.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test_images").mkdir(parents=True)

    def save(index: int, path: Path) -> None:
        pixels = (digits.images[index] * (255 / 16)).clip(0, 255).astype("uint8")
        Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(path)

    answers = []
    for rank, index in enumerate(order):
        label = str(digits.target[index])
        if rank < n_test:
            image_id = f"test_{rank:04d}.png"
            save(index, tmp / "test_images" / image_id)
            answers.append((image_id, label))
        else:
            folder = tmp / "train_images" / label
            folder.mkdir(parents=True, exist_ok=True)
            save(index, folder / f"digit_{index:04d}.png")
    answers.sort()
    with open(tmp / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "label"), *((i, "0") for i, _ in answers)])
    with open(tmp / "solution.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "label"), *answers])
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


BUILDERS = {"digits": build_digits}


def ensure_data(project: Project, comp: Competition) -> Path:
    """The competition's data folder: built first if the competition is embedded, else it must exist."""
    root = comp.data_path(project)
    if not root.is_dir():
        if comp.builtin:
            BUILDERS[comp.builtin](root)
        elif comp.kaggle:
            from . import kaggle

            print(f"downloading {comp.kaggle} from Kaggle into {project.relative(root)} ...", file=sys.stderr, flush=True)
            kaggle.download(comp.kaggle, root)
        else:
            raise ConfigError(f"competitions/{comp.name}.yaml: data folder {project.relative(root)} is missing; "
                              "put the competition's files there or set data_dir")
    return root


# --------------------------------------------------------------------------------------------- layout and split
def _is_image(path: Path, comp: Competition) -> bool:
    return path.suffix.lower() in comp.image_extensions


def list_train(comp: Competition, root: Path) -> tuple[list[str], list[str]]:
    """(relative paths, labels) of the training images, sorted by path."""
    layout = comp.train
    if layout.layout == "folders":
        folder = root / layout.folder
        if not folder.is_dir():
            raise EnsError(f"competitions/{comp.name}.yaml: train.folder {folder} does not exist; fix train.folder")
        items = sorted((p.relative_to(root).as_posix(), p.parent.name)
                       for p in folder.glob("*/*") if p.is_file() and _is_image(p, comp))
    else:
        import pandas as pd

        table = pd.read_csv(root / layout.csv, dtype=str)
        for col in (layout.id_column, layout.label_column):
            if col not in table.columns:
                raise EnsError(f"competitions/{comp.name}.yaml: train.csv {layout.csv} has no column '{col}' "
                               f"(columns: {', '.join(table.columns)})")
        items = sorted((layout.path_template.format(id=i), str(l))
                       for i, l in zip(table[layout.id_column], table[layout.label_column]))
        missing = [p for p, _ in items if not (root / p).is_file()]
        if missing:
            raise EnsError(f"competitions/{comp.name}.yaml: {len(missing)} images named by {layout.csv} are missing, "
                           f"first {missing[0]}; check train.path_template")
    if not items:
        raise EnsError(f"competitions/{comp.name}.yaml: no training images found under {root}; check the train layout")
    paths, labels = zip(*items)
    return list(paths), list(labels)


def validation_mask(paths: list[str], labels: list[str], valid_pct: float, seed: int, stratified: bool) -> list[bool]:
    """The fixed validation split: images ranked by a seeded hash of their path, the first `valid_pct` taken
    (per class when stratified). It depends on nothing but the paths, labels and seed — no library's RNG —
    so it never moves between machines or versions."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label if stratified else "", []).append(i)
    valid = [False] * len(paths)
    for members in groups.values():
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{paths[i]}".encode()).hexdigest())
        for i in ranked[: int(round(len(ranked) * valid_pct))]:
            valid[i] = True
    return valid


def list_test(comp: Competition, root: Path) -> list[str]:
    folder = root / comp.test_images
    if not folder.is_dir():
        raise EnsError(f"competitions/{comp.name}.yaml: test_images folder {folder} does not exist; fix test_images")
    return sorted(p.relative_to(root).as_posix() for p in folder.iterdir() if p.is_file() and _is_image(p, comp))


# --------------------------------------------------------------------------------------------- fingerprint
def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_fingerprint(root: Path, relative_paths: list[str], extra: str, memo_file: Path) -> str:
    """A hash of the files' contents and `extra` (labels, split). Hashing a gigabyte of images costs seconds, so
    the result is memoised under the files' (size, mtime) signature: unchanged files are not read again."""
    stat_sig = hashlib.sha256(extra.encode())
    for rel in relative_paths:
        st = (root / rel).stat()
        stat_sig.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    stat_sig = stat_sig.hexdigest()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get("stat") == stat_sig:
        return memo["content"]
    content = hashlib.sha256(extra.encode())
    for rel in relative_paths:
        content.update(f"{rel}\0{_file_digest(root / rel)}\n".encode())
    content = content.hexdigest()
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"stat": stat_sig, "content": content}))
    os.replace(tmp, memo_file)
    return content


def load_data(project: Project, comp: Competition) -> CompetitionData:
    root = ensure_data(project, comp)
    paths, labels = list_train(comp, root)
    split = comp.split
    valid = validation_mask(paths, labels, split.valid_pct, split.seed, split.stratified)
    test = list_test(comp, root)
    extra = json.dumps([labels, valid, comp.train.model_dump(), comp.test_images])
    files = paths + test + ([comp.train.csv] if comp.train.layout == "csv" else [])
    fp = content_fingerprint(root, files, extra, project.cache / "fingerprints" / f"{comp.name}.json")
    return CompetitionData(comp, root, paths, labels, valid, test, fp)


def train_fraction(data: CompetitionData, fraction: float, seed: int = 42) -> CompetitionData:
    """The same competition with a stratified `fraction` of its training images (at least one per class) and all
    of its validation images: per class, the images ranked by a seeded hash of their path, the first taken (like
    the validation split, no library's RNG). For quick trials (`ens tune`); the fingerprint says which subset."""
    if fraction >= 1:
        return data
    groups: dict[str, list[int]] = {}
    for i, (label, valid) in enumerate(zip(data.train_labels, data.is_valid)):
        if not valid:
            groups.setdefault(label, []).append(i)
    keep = {i for i, v in enumerate(data.is_valid) if v}
    for members in groups.values():
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"fraction:{seed}:{data.train_paths[i]}".encode()).digest())
        keep.update(ranked[: max(1, int(round(len(ranked) * fraction)))])
    rows = sorted(keep)
    fingerprint = hashlib.sha256(f"{data.fingerprint}:fraction:{fraction}:{seed}".encode()).hexdigest()
    return replace(data, train_paths=[data.train_paths[i] for i in rows],
                   train_labels=[data.train_labels[i] for i in rows], is_valid=[data.is_valid[i] for i in rows],
                   fingerprint=fingerprint)


# --------------------------------------------------------------------------------------------- prepared copies
def prepare_data(data: CompetitionData, prepare, cache_root: Path) -> CompetitionData:
    """The same competition read from a copy whose images are shrunk so that the longer side is at most
    `prepare.max_size` (smaller ones are copied as they are), built once in parallel in
    cache/prepared/<competition>/<settings and data hash>/ and renamed into place when complete."""
    key = hashlib.sha256(json.dumps([data.fingerprint, prepare.model_dump()], sort_keys=True).encode()).hexdigest()[:16]
    dest = cache_root / "prepared" / data.competition.name / f"max{prepare.max_size}-{key}"
    if not dest.is_dir():
        from fastai.vision.utils import resize_image
        from fastcore.parallel import parallel

        tmp = dest.with_name(dest.name + f".building-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        files = [Path(p) for p in data.train_paths + data.test_paths]
        parallel(resize_image, files, src=data.root, dest=tmp, max_size=prepare.max_size, quality=prepare.quality,
                 n_workers=os.cpu_count() or 1, progress=False)
        unreadable = [str(f) for f in files if not (tmp / f).is_file()]
        if unreadable:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EnsError(f"{len(unreadable)} images could not be read, first {data.root / unreadable[0]}; "
                           "remove or replace them")
        tmp.rename(dest)
    return replace(data, root=dest)


# --------------------------------------------------------------------------------------------- DataLoaders
def dataloaders(data: CompetitionData, member, size, device=None):
    """fastai DataLoaders for the training/validation split at `size` (normalisation is added by the caller, who
    knows the model's statistics).

    Call fastai's `set_seed` first: DataLoaders draw their own shuffling RNG from Python's `random` when built.
    """
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, IndexSplitter, ItemGetter, Resize, aug_transforms

    # (path, label) pairs, not a DataFrame: reading pandas rows per item cost ~5% of a small member's run
    items = [(str(data.root / p), label) for p, label in zip(data.train_paths, data.train_labels)]
    valid_idx = [i for i, v in enumerate(data.is_valid) if v]
    resize = member.resize
    item_tfms = [Resize(resize.size or size, method=resize.method)]
    batch_tfms = []
    if member.aug_transforms is not None:
        batch_tfms += aug_transforms(size=size, **member.aug_transforms.model_dump())
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=data.vocab)), get_x=ItemGetter(0),
                      get_y=ItemGetter(1), splitter=IndexSplitter(valid_idx),
                      item_tfms=item_tfms, batch_tfms=batch_tfms)
    workers = member.num_workers if member.num_workers is not None else min(8, os.cpu_count() or 1)
    return block.dataloaders(items, bs=member.batch_size, num_workers=workers, device=device)
