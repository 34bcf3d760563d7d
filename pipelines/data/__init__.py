"""The data stage. This module: a competition's files on disk — the embedded digits build, the layout (class
folders or a labels CSV), the fixed validation split and folds, a content fingerprint, damaged-image checks and
prepared (shrunk) copies. `loaders`: fastai DataLoaders at a size, from the JPEGs or from `decoded`, the uint8
copies decoded once per pre-size.

fastai is imported only inside the loaders' functions: listing and fingerprinting stay cheap.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Competition, Project
from ..errors import ConfigError, EnsError
from ..util import building, file_lock, lock_file_for, owner_tag, process_pool, read_csv, sweep_dead, write_json


@dataclass(frozen=True)
class CompetitionData:
    """Everything a member needs to know about the images, as paths relative to `root`."""

    competition: Competition
    root: Path
    train_paths: list[str]
    train_labels: list[str]
    is_valid: list[bool]
    test_paths: list[str]
    fingerprint: str  # the images, labels and split: a member's training key holds it
    images_fingerprint: str = ""  # the images and labels alone: the same for every fold of a cross-validation
    cv_fold: dict | None = None  # a fold of a cross-validation: {fold (or 'refit'), folds, assignment (a hash)}
    cache_root: Path | None = None  # the project's cache/: decoded copies are built under it (`decoded`)
    # distillation: (the training rows' target distributions N×C, their loss weights N): one-hot rows for labelled
    # images, a teacher's probabilities for the test images added (`with_soft_targets`); None: class labels
    soft_targets: tuple | None = None

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
        return submission_ids(self.competition, self.test_paths)


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
    tmp = dest.with_name(dest.name + f".building-{owner_tag()}")
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
    """The competition's data folder: built first if the competition is embedded (by one run at a time; the
    others wait and use it), downloaded if it is on Kaggle, else it must exist."""
    root = comp.data_path(project)
    if not root.is_dir():
        if comp.builtin:
            with building(root, [f"{glob.escape(root.name)}.building-{{owner}}"], lock_file_for(root)):
                if not root.is_dir():
                    BUILDERS[comp.builtin](root)
        elif comp.kaggle:
            from .. import kaggle

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
        # a class folder's images may lie in subfolders of it (train/cat/batch1/...): the class is the first
        # folder under train.folder, whatever the depth
        items = sorted((p.relative_to(root).as_posix(), p.relative_to(folder).parts[0])
                       for p in folder.glob("*/**/*") if p.is_file() and _is_image(p, comp))
    else:
        columns, rows = read_csv(root / layout.csv)
        for col in (layout.id_column, layout.label_column):
            if col not in columns:
                raise EnsError(f"competitions/{comp.name}.yaml: train.csv {layout.csv} has no column '{col}' "
                               f"(columns: {', '.join(columns)})")
        items = sorted((layout.path_template.format(id=r[layout.id_column]), r[layout.label_column]) for r in rows)
        missing = [p for p, _ in items if not (root / p).is_file()]
        if missing:
            raise EnsError(f"competitions/{comp.name}.yaml: {len(missing)} images named by {layout.csv} are missing, "
                           f"first {missing[0]}; check train.path_template")
    if not items:
        raise EnsError(f"competitions/{comp.name}.yaml: no training images found under {root}; check the train layout")
    paths, labels = zip(*items)
    return list(paths), list(labels)


def validation_mask(paths: list[str], labels: list[str], valid_pct: float, seed: int, stratified: bool,
                    groups: list[str] | None = None) -> list[bool]:
    """The fixed validation split: images ranked by a seeded hash of their path, the first `valid_pct` taken
    (per class when stratified). It depends on nothing but the paths, labels and seed — no library's RNG —
    so it never moves between machines or versions. With `groups` (`cv.group_column`: a patient, a plant),
    whole groups validate (`_group_validation`): a validation image whose group also trains is not unseen."""
    if groups is not None:
        return _group_validation(labels, groups, valid_pct, seed, stratified)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label if stratified else "", []).append(i)
    valid = [False] * len(paths)
    for members in groups.values():
        ranked = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{paths[i]}".encode()).hexdigest())
        for i in ranked[: int(round(len(ranked) * valid_pct))]:
            valid[i] = True
    return valid


def _group_validation(labels: list[str], groups: list[str], valid_pct: float, seed: int,
                      stratified: bool) -> list[bool]:
    """Whole groups validate: groups ranked by a seeded hash of their id (within their most frequent class when
    stratified, so classes keep their share as far as the groups allow), each taken when it brings its class's
    validated images closer to `valid_pct` of that class's images than leaving it out would."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    buckets: dict[str, list[str]] = {}
    for group, rows in members.items():
        counts: dict[str, int] = {}
        for i in rows:
            counts[labels[i]] = counts.get(labels[i], 0) + 1
        key = min(counts, key=lambda c: (-counts[c], c)) if stratified else ""
        buckets.setdefault(key, []).append(group)
    valid = [False] * len(labels)
    for bucket in buckets.values():
        target = sum(len(members[g]) for g in bucket) * valid_pct
        taken = 0
        for group in sorted(bucket, key=lambda g: (hashlib.sha256(f"{seed}:group:{g}".encode()).hexdigest(), g)):
            if 2 * (target - taken) > len(members[group]):  # nearer the target with it than without
                taken += len(members[group])
                for i in members[group]:
                    valid[i] = True
    return valid


def fold_assignment(paths: list[str], labels: list[str], n_folds: int, seed: int, stratified: bool = True,
                    groups: list[str] | None = None) -> list[int]:
    """Each image's cross-validation fold (0..n_folds-1), hash-based like `validation_mask` so it never moves
    between machines or versions, and independent of the input order (an image's fold depends on the set of
    images). Without groups, images are ranked by a seeded hash of their path and dealt round-robin, class after
    class (sorted) when stratified: fold sizes and each class's per-fold counts differ by at most 1. A class with
    fewer images than folds is allowed; some folds then lack it. With `groups` (a plant or patient id per image),
    whole groups are assigned, so no group straddles folds; see `_group_folds`."""
    if len(labels) != len(paths) or (groups is not None and len(groups) != len(paths)):
        raise ValueError(f"fold_assignment: {len(paths)} paths but {len(labels)} labels"
                         + ("" if groups is None else f" and {len(groups)} groups"))
    if n_folds < 2:
        raise ValueError(f"fold_assignment: n_folds must be at least 2, got {n_folds}")
    if n_folds > len(paths):
        raise ValueError(f"fold_assignment: {n_folds} folds but only {len(paths)} images")
    if groups is not None:
        return _group_folds(labels, groups, n_folds, seed, stratified)
    buckets: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        buckets.setdefault(label if stratified else "", []).append(i)
    folds = [0] * len(paths)
    dealt = 0  # one deal across classes, so the folds that get a class's extra image rotate and sizes stay even
    for key in sorted(buckets):
        for i in sorted(buckets[key], key=lambda i: (hashlib.sha256(f"fold:{seed}:{paths[i]}".encode()).digest(),
                                                     paths[i])):
            folds[i] = dealt % n_folds
            dealt += 1
    return folds


def _group_folds(labels: list[str], groups: list[str], n_folds: int, seed: int, stratified: bool) -> list[int]:
    """Group k-fold: groups taken largest first (ties by a seeded hash of the group id), each to the smallest fold,
    or when stratified to the fold minimising the growth of the folds' sum of squared class shares plus fold-size
    share: the fold where its classes are scarcest (StratifiedGroupKFold's idea, without its RNG). Greedy, so
    balance is as good as the groups allow, not exact; fold sizes from the unstratified rule differ by at most the
    largest group."""
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    if n_folds > len(members):
        raise ValueError(f"fold_assignment: {n_folds} folds but only {len(members)} groups")
    order = sorted(members, key=lambda g: (-len(members[g]), hashlib.sha256(f"fold-group:{seed}:{g}".encode()).digest(),
                                           str(g)))
    class_total: dict[str, int] = {}
    for label in labels:
        class_total[label] = class_total.get(label, 0) + 1
    n = len(labels)
    sizes = [0] * n_folds
    per_class: list[dict[str, int]] = [{} for _ in range(n_folds)]
    folds = [0] * n
    for group in order:
        size = len(members[group])
        counts: dict[str, int] = {}
        for i in members[group]:
            counts[labels[i]] = counts.get(labels[i], 0) + 1

        def cost(f: int) -> tuple:
            if not stratified:
                return sizes[f], f
            scarcity = sum(k * per_class[f].get(c, 0) / class_total[c] ** 2 for c, k in sorted(counts.items()))
            return scarcity + size * sizes[f] / n ** 2, sizes[f], f

        best = min(range(n_folds), key=cost)
        sizes[best] += size
        for c, k in counts.items():
            per_class[best][c] = per_class[best].get(c, 0) + k
        for i in members[group]:
            folds[i] = best
    return folds


def read_groups(comp: Competition, root: Path, paths: list[str]) -> list[str]:
    """Each training image's group (`cv.group_column`), from the labels CSV (csv layout) or from `cv.groups_csv`
    (ids are image file names there): one line naming the image when one has none."""
    cv, layout = comp.cv, comp.train
    source = cv.groups_csv or layout.csv
    where = f"competitions/{comp.name}.yaml"
    try:
        columns, rows = read_csv(root / source)
    except FileNotFoundError:
        raise EnsError(f"{where}: cv groups file {root / source} is missing; fix cv.groups_csv") from None
    for col in (layout.id_column, cv.group_column):
        if col not in columns:
            raise EnsError(f"{where}: {source} has no column '{col}' (columns: {', '.join(columns)}); "
                           "fix cv.group_column (or train.id_column)")
    if cv.groups_csv:  # ids are file names (or paths relative to the data folder)
        by_id = {r[layout.id_column]: r[cv.group_column] for r in rows}
        groups = [by_id.get(p, by_id.get(Path(p).name)) for p in paths]
    else:
        by_path = {layout.path_template.format(id=r[layout.id_column]): r[cv.group_column] for r in rows}
        groups = [by_path.get(p) for p in paths]
    missing = [p for p, g in zip(paths, groups) if not g]  # None (no row), or an empty cell
    if missing:
        raise EnsError(f"{where}: {len(missing)} training images have no {cv.group_column} in {source}, first "
                       f"{missing[0]}; give every image a group (or drop cv.group_column)")
    return [str(g) for g in groups]


def cv_folds(data: "CompetitionData") -> list[int]:
    """Each training image's fold under the competition's `cv` (hash-based: fixed across machines and runs)."""
    comp = data.competition
    cv = comp.cv
    groups = read_groups(comp, data.root, data.train_paths) if cv.group_column else None
    try:
        return fold_assignment(data.train_paths, data.train_labels, cv.folds, cv.seed, cv.stratified, groups)
    except ValueError as e:
        raise EnsError(f"competitions/{comp.name}.yaml: cv: {str(e).removeprefix('fold_assignment: ')}; "
                       "lower cv.folds") from None


def fold_data(data: "CompetitionData", folds: list[int], fold: int | None) -> "CompetitionData":
    """The competition as fold `fold`'s model sees it: that fold's images validate, the others train. `None`: a
    refit on every training image (no validation images). The fingerprint says which fold of which assignment,
    so each fold model is its own cache entry."""
    folds = [int(f) for f in folds]
    valid = [False] * len(folds) if fold is None else [f == fold for f in folds]
    what = "refit on every training image" if fold is None else f"cv fold {fold} of {json.dumps(folds)}"
    fingerprint = hashlib.sha256(f"{data.fingerprint}:{what}".encode()).hexdigest()
    assignment = hashlib.sha256(json.dumps(folds).encode()).hexdigest()[:12]
    cv_fold = {"fold": "refit" if fold is None else fold, "folds": max(folds) + 1, "assignment": assignment}
    return replace(data, is_valid=valid, fingerprint=fingerprint, cv_fold=cv_fold)


def with_pseudo_labels(data: "CompetitionData", paths: list[str], labels: list[str]) -> "CompetitionData":
    """The competition with test images `paths` added to the training images (never validating) under `labels`;
    the fingerprint holds them, so other pseudo-labels make another training key."""
    blob = json.dumps([data.fingerprint, "pseudo", paths, labels])
    return replace(data, train_paths=data.train_paths + list(paths), train_labels=data.train_labels + list(labels),
                   is_valid=data.is_valid + [False] * len(paths),
                   fingerprint=hashlib.sha256(blob.encode()).hexdigest())


def with_soft_targets(data: "CompetitionData", probs, weight: float) -> "CompetitionData":
    """Every test image added to the training images with `probs` (one row per test image, the vocab's order) as
    its target distribution and `weight` as its loss weight; the labelled rows keep their class (one-hot, weight
    1). Their labels are the teacher's classes (for fastai's vocab and the splits; the loss reads the targets)."""
    import numpy as np

    probs = np.asarray(probs, dtype="float32")
    vocab = data.vocab
    index = {label: i for i, label in enumerate(vocab)}
    onehot = np.eye(len(vocab), dtype="float32")[[index[label] for label in data.train_labels]]
    targets = np.concatenate([onehot, probs])
    weights = np.concatenate([np.ones(len(onehot), "float32"), np.full(len(probs), weight, "float32")])
    blob = hashlib.sha256(targets.tobytes() + weights.tobytes()).hexdigest()
    return replace(data, train_paths=data.train_paths + list(data.test_paths),
                   train_labels=data.train_labels + [vocab[i] for i in probs.argmax(1)],
                   is_valid=data.is_valid + [False] * len(probs), soft_targets=(targets, weights),
                   fingerprint=hashlib.sha256(f"{data.fingerprint}:distill:{blob}".encode()).hexdigest())


def list_test(comp: Competition, root: Path) -> list[str]:
    """The test images, sorted: those of the test_images folder; in a folder shared with the training images
    (images/Train_* beside images/Test_*, labelled by a CSV), those the sample submission names."""
    folder = root / comp.test_images
    if not folder.is_dir():
        raise EnsError(f"competitions/{comp.name}.yaml: test_images folder {folder} does not exist; fix test_images")
    paths = sorted(p.relative_to(root).as_posix() for p in folder.iterdir() if p.is_file() and _is_image(p, comp))
    if _shares_training_folder(comp):
        wanted = set(sample_ids(comp, root))
        paths = [p for p, i in zip(paths, submission_ids(comp, paths)) if i in wanted]
    return paths


def _shares_training_folder(comp: Competition) -> bool:
    layout = comp.train
    return layout.layout == "csv" and Path(layout.path_template).parent == Path(comp.test_images)


# --------------------------------------------------------------------------------------------- fingerprint
def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_fingerprint(root: Path, relative_paths: list[str], extra: str, memo_file: Path) -> str:
    """A hash of the files' contents and `extra` (labels, split). Hashing a gigabyte of images costs seconds, so
    the result is memoised under the files' stat signature: unchanged files are not read again. The signature
    holds what `utime` cannot set back (inode, ctime) besides size and mtime: a file replaced by another of the
    same size with its mtime restored (`cp -p`, `rsync -t`, tar, unzip) is read again. A signature that differs
    only costs a re-hash: data re-extracted or copied elsewhere with the same content keeps its fingerprint, and
    so every cached member."""
    stat_sig = hashlib.sha256(extra.encode())
    for rel in relative_paths:
        st = (root / rel).stat()
        stat_sig.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\n".encode())
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
    write_json(memo_file, {"stat": stat_sig, "content": content})
    return content


def load_data(project: Project, comp: Competition) -> CompetitionData:
    """The competition's images, labels, split and fingerprint, checked before any time is spent on them: every
    sample-submission id has a test image, and every image decodes (verified once per data fingerprint)."""
    root = ensure_data(project, comp)
    paths, labels = list_train(comp, root)
    split = comp.split
    groups = read_groups(comp, root, paths) if comp.cv.group_column else None  # whole groups validate
    valid = validation_mask(paths, labels, split.valid_pct, split.seed, split.stratified, groups)
    test = list_test(comp, root)
    check_sample_ids(comp, root, test)
    extra = json.dumps([labels, valid, comp.train.model_dump(), comp.test_images])
    files = paths + test + ([comp.train.csv] if comp.train.layout == "csv" else [])
    fingerprints = project.cache / "fingerprints"
    fp = content_fingerprint(root, files, extra, fingerprints / f"{comp.name}.json")
    damaged = verified_images(root, paths + test, fp, fingerprints / f"{comp.name}.images.json")
    bad_test = [p for p in test if p in damaged]
    if bad_test:
        raise EnsError(f"competitions/{comp.name}.yaml: {_count(bad_test, 'test image')} cannot be decoded: "
                       f"{_listing(project, root, bad_test, damaged)}; the submission needs a prediction for every "
                       "test image: replace them with intact copies (fetch the competition's data again)")
    bad_train = [p for p in paths if p in damaged]
    if bad_train:
        listing = _listing(project, root, bad_train, damaged)
        if comp.damaged_images == "error":
            raise EnsError(f"competitions/{comp.name}.yaml: {_count(bad_train, 'training image')} cannot be decoded: "
                           f"{listing}; replace or delete them, or set `damaged_images: skip` in "
                           f"competitions/{comp.name}.yaml to train without them")
        print(f"note: leaving {_count(bad_train, 'damaged training image')} out (damaged_images: skip): {listing}",
              file=sys.stderr, flush=True)
        keep = [i for i, p in enumerate(paths) if p not in damaged]
        if not keep:
            raise EnsError(f"competitions/{comp.name}.yaml: every training image is damaged; fix the data")
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        groups = None if groups is None else [groups[i] for i in keep]
        valid = validation_mask(paths, labels, split.valid_pct, split.seed, split.stratified, groups)
        # other training images, other split: other members (the full data's fingerprint and what was left out)
        fp = hashlib.sha256(f"{fp}:damaged images left out:{json.dumps(sorted(bad_train))}".encode()).hexdigest()
    return CompetitionData(comp, root, paths, labels, valid, test, fp, fp, cache_root=project.cache)


def _count(items, what: str) -> str:
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''}"


def _listing(project: Project, root: Path, bad: list[str], reasons: dict[str, str], first: int = 3) -> str:
    shown = ", ".join(f"{project.relative(root / p)} ({reasons[p]})" for p in bad[:first])
    return shown + (f" and {len(bad) - first} more" if len(bad) > first else "")


def submission_ids(comp: Competition, test_paths: list[str]) -> list[str]:
    """A test image's id in the submission: its file name, or its stem (`test_id`)."""
    return [Path(p).stem if comp.test_id == "stem" else Path(p).name for p in test_paths]


def sample_ids(comp: Competition, root: Path) -> list[str]:
    """The ids of the sample submission, in its order; one line when it is missing or has no id column."""
    sample = root / comp.sample_submission
    where = f"competitions/{comp.name}.yaml"
    try:
        columns, rows = read_csv(sample)
    except FileNotFoundError:
        raise EnsError(f"{where}: the sample submission {sample} is missing; put the competition's "
                       "sample_submission.csv there or fix sample_submission") from None
    if comp.id_column not in columns:
        raise EnsError(f"{where}: the sample submission {sample} has no id column '{comp.id_column}' "
                       f"(columns: {', '.join(columns) or 'none'}); fix id_column")
    return [row[comp.id_column] for row in rows]


def check_sample_ids(comp: Competition, root: Path, test_paths: list[str]) -> None:
    """Every id of the sample submission names a test image (else the submission cannot be written: found here,
    before any member trains, rather than after all of them)."""
    where = f"competitions/{comp.name}.yaml"
    ids = sample_ids(comp, root)
    known = set(submission_ids(comp, test_paths))
    missing = [i for i in ids if i not in known]
    if missing:
        raise EnsError(f"{where}: {len(missing)} ids of the sample submission have no test image, first "
                       f"'{missing[0]}' (looked in {comp.test_images}/, {len(known)} images, ids by "
                       f"test_id: {comp.test_id}); check test_images and test_id, or add the missing images")


# --------------------------------------------------------------------------------------------- image verification
def _decode_problem(path: str) -> str | None:
    """Why PIL cannot decode the image at `path` completely (what fastai would raise mid-epoch), or None.
    `verify()` alone misses truncation: the pixels are decoded."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return " ".join(str(e).split())[:120] or type(e).__name__
    return None


def find_damaged(root: Path, relative_paths: list[str]) -> dict[str, str]:
    """{relative path: reason} of the images PIL cannot decode. In a process pool when there is a lot to decode
    (JPEGs cost ~3 ms each), in this process when there is little (the digits' PNGs: 0.1 ms)."""
    files = [str(root / p) for p in relative_paths]
    total = sum(os.stat(f).st_size for f in files)
    workers = min(os.cpu_count() or 1, 1 + total // (32 << 20), max(1, len(files) // 64))
    if workers <= 1:
        problems = [_decode_problem(f) for f in files]
    else:
        import PIL.Image  # noqa: F401 - imported before the fork: the workers only decode

        with process_pool(workers) as pool:
            problems = list(pool.map(_decode_problem, files, chunksize=max(1, len(files) // (workers * 16))))
    return {p: why for p, why in zip(relative_paths, problems) if why is not None}


def verified_images(root: Path, relative_paths: list[str], fingerprint: str, memo_file: Path) -> dict[str, str]:
    """find_damaged, memoised under the data's content fingerprint: decoding 10k JPEGs takes tens of seconds,
    so the same data is verified once (the memo keeps the last few fingerprints)."""
    try:
        memo = json.loads(memo_file.read_text())
        if fingerprint in memo:
            return dict(memo[fingerprint])
    except (OSError, ValueError, TypeError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    damaged = find_damaged(root, relative_paths)
    memo.pop(fingerprint, None)
    memo = dict(list(memo.items())[-3:]) | {fingerprint: sorted(damaged.items())}
    write_json(memo_file, memo)
    return damaged


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
    cache/prepared/<competition>/<settings and data hash>/ and renamed into place when complete. One run builds
    a copy at a time; another that needs it waits, then uses it. Copies half-built by dead runs are swept."""
    dest = prepared_folder(data, prepare, cache_root)
    files = data.train_paths + data.test_paths
    if not _intact(dest, files):
        with building(dest, ["*.building-{owner}", "*.tmp{owner}", "*.tmp{owner}-*"]):
            if not _intact(dest, files):
                shutil.rmtree(dest, ignore_errors=True)  # an older version's copy with images missing or empty
                _build_prepared(data, prepare, dest)
    return replace(data, root=dest)


def prepared_folder(data: CompetitionData, prepare, cache_root: Path) -> Path:
    """Where `prepare_data` keeps the copy (built or not)."""
    # the images, not the split: every fold of a cross-validation reads one copy
    images = [data.images_fingerprint or data.fingerprint, data.train_paths, data.test_paths]
    key = hashlib.sha256(json.dumps([images, prepare.model_dump()], sort_keys=True).encode()).hexdigest()[:16]
    return cache_root / "prepared" / data.competition.name / f"max{prepare.max_size}-{key}"


def _intact(dest: Path, files: list[str]) -> bool:
    """Is the prepared copy at `dest` there, with every image non-empty? (A stat per image: milliseconds.)"""
    try:
        return dest.is_dir() and all((dest / f).stat().st_size > 0 for f in files)
    except OSError:
        return False


def _shrink(file: Path, **kwargs) -> str | None:
    """fastai's resize_image of one file: None, or why it failed (the caller names the images it could not
    read). A full disk is raised: it is no fault of the image."""
    from fastai.vision.utils import resize_image

    from ..errors import disk_full

    try:
        resize_image(file, **kwargs)
    except OSError as e:
        if disk_full(e):
            raise
        return str(e) or type(e).__name__
    except Exception as e:  # noqa: BLE001 - reported as a missing copy
        return str(e) or type(e).__name__
    return None


def _build_prepared(data: CompetitionData, prepare, dest: Path) -> None:
    from functools import partial

    import fastai.vision.utils  # noqa: F401 - imported before the fork: the workers only resize

    from ..errors import disk_full, disk_full_error

    tmp = dest.with_name(dest.name + f".building-{owner_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files = [Path(p) for p in data.train_paths + data.test_paths]
    resize = partial(_shrink, src=data.root, dest=tmp, max_size=prepare.max_size, quality=prepare.quality)
    try:
        with process_pool(os.cpu_count() or 1) as pool:  # fastcore's `parallel`, with workers that die with this run
            problems = list(pool.map(resize, files, chunksize=max(1, len(files) // ((os.cpu_count() or 1) * 8))))
        # an empty copy is a write that failed unseen (PIL, or a copy cut short): never renamed into place
        unreadable = [(f, why) for f, why in zip(files, problems)
                      if why or not (tmp / f).is_file() or not (tmp / f).stat().st_size]
        if unreadable:
            first, why = unreadable[0]
            raise EnsError(f"{len(unreadable)} images could not be read, first {data.root / first}"
                           f"{f' ({why})' if why else ''}; remove or replace them")
        tmp.rename(dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise disk_full_error(dest.parent, "a prepared copy of the images") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


from .loaders import dataloaders, test_loader  # noqa: E402,F401 - fastai is imported inside them
