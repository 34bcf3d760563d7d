"""`ens init`: a competition's YAML and a starter ensemble, written from its data (downloaded from Kaggle, or a
folder on disk) instead of by hand.

The data is read the way training will read it (`data.list_train`, `list_test`, `submission_ids` on a draft
`Competition`), so a guess that training could not use is refused here, in one line naming the field to set. Every
guessed value is written with a `# guessed: ...` comment saying what was seen, for the user to review.

Pure Python, csv and PIL (opened for the size only, never decoded): `ens init --help` stays fast.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import yaml

from . import config, data
from .config import Competition, Expected, Project, TrainLayout
from .errors import ConfigError, EnsError
from .util import read_csv  # the one way every stage reads a CSV

DEFAULT_EXTENSIONS = tuple(Competition.model_fields["image_extensions"].default)
IMAGE_EXTENSIONS = DEFAULT_EXTENSIONS + (".tif", ".tiff", ".bmp", ".webp")  # what PIL reads and init looks for
MATCH = 0.9  # the share of a column's values that must name files for the column to be an id column
PROBE_ROWS = 200  # rows of a CSV tried against the image files
SIZE_SAMPLE = 50  # images opened for their size
LABEL_WORDS = ("label", "class", "target", "diagnosis", "category")
POSITIVE = {"1", "true", "yes", "y", "t", "fake", "positive", "pos", "malignant", "abnormal", "anomaly", "anomalous",
            "defect", "defective", "disease", "diseased", "sick", "tumor", "tumour", "cancer", "spoof", "forged",
            "generated", "synthetic", "ai", "fraud", "attack", "present", "detected"}
METRICS = "accuracy | log_loss | f1_macro | roc_auc"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

ARCH = "convnext_tiny.fb_in22k"


@dataclass
class Files:
    """The data folder's images and CSVs, as POSIX paths relative to `root`."""

    root: Path
    images: list[str]
    csvs: list[str]

    @cached_property
    def folders(self) -> Counter:
        """Folder → how many images it holds directly ('.': the root)."""
        return Counter(str(PurePosixPath(p).parent) for p in self.images)

    @cached_property
    def extensions(self) -> dict[str, list[str]]:
        """Folder → the image file suffixes found in it, as spelled (file names are case-sensitive)."""
        seen: dict[str, set[str]] = {}
        for p in map(PurePosixPath, self.images):
            seen.setdefault(str(p.parent), set()).add(p.suffix)
        return {folder: sorted(exts) for folder, exts in seen.items()}


@dataclass
class Draft:
    """The competition as guessed so far, and the comment written beside each field that has one (top-level key →
    comment; `guessed: ...` for the guesses)."""

    comp: Competition
    notes: dict[str, str] = field(default_factory=dict)

    def set(self, note: str = "", **values) -> None:
        self.comp = self.comp.model_copy(update=values)  # validated once written, by load_competition
        self.notes.update({key: note for key in values if note})

    @property
    def guesses(self) -> int:
        return sum(note.startswith("guessed:") for note in self.notes.values())


@dataclass
class Result:
    """What `ens init` wrote and what the checks found in it."""

    competition_file: Path
    ensemble_file: Path
    comp: Competition
    classes: list[str]
    train_images: int
    test_images: int
    image_size: tuple[int, int] | None
    starter_size: int
    guesses: int


# --------------------------------------------------------------------------------------------- the command
def init_competition(project: Project, name: str | None = None, *, slug: str | None = None,
                     folder: Path | None = None, force: bool = False, pretrained: bool = True,
                     positive_class: str | None = None) -> Result:
    """Write competitions/NAME.yaml and ensembles/NAME/starter.yaml from Kaggle's competition `slug` (downloaded
    into cache/data/NAME) or from `folder`; then load both back and run training's data checks on them."""
    name = name or slug
    if not name or not _NAME.fullmatch(name):
        raise ConfigError(f"'{name}': a competition name is letters, digits, '_', '-' and '.' (it names "
                          "competitions/NAME.yaml); give another with --name")
    files = _targets(project, name, force)
    info = None
    if slug:
        from . import kaggle

        root = project.root / "cache/data" / name
        if not root.is_dir():
            print(f"downloading {slug} from Kaggle into {project.relative(root)} ...", file=sys.stderr, flush=True)
        kaggle.download(slug, root)
        info = _ask_kaggle(slug)
    else:
        root = Path(folder).resolve()
        if not root.is_dir():
            raise ConfigError(f"--data {folder}: no such folder; give the folder holding the competition's files")
    source = {"kaggle": slug} if slug else {"data_dir": project.relative(root)}
    draft, labels, paths, test = infer(root, Competition(name=name, **source), info, positive_class)
    size = common_size(root, paths + test)
    expected = Expected(classes=len(set(labels)), train_images=len(paths), test_images=len(test), image_size=size)
    starter = starter_size(size)
    files[0].write_text(competition_yaml(draft, expected), encoding="utf-8")
    config.write_ensemble(files[1], starter_member(name, starter, pretrained),
                          starter_header(name, starter, pretrained))
    return _verify(project, name, files, size, starter, draft.guesses)


def _targets(project: Project, name: str, force: bool) -> tuple[Path, Path]:
    files = (project.competitions / f"{name}.yaml", project.ensembles / name / "starter.yaml")
    existing = [project.relative(f) for f in files if f.exists()]
    if existing and not force:
        raise ConfigError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                          f"pass --force to overwrite, or choose another name (ens init --data FOLDER OTHER_NAME, or "
                          f"ens init SLUG --name OTHER_NAME)")
    return files


def _ask_kaggle(slug: str) -> dict | None:
    """Kaggle's title, metric and submission kind, or None (said on stderr) when it cannot say: the YAML is
    written with guesses instead."""
    from . import kaggle

    try:
        return kaggle.competition_info(slug)
    except kaggle.KaggleError as e:
        print(f"note: could not ask Kaggle about '{slug}' ({e}); the title, metric and submission kind in the YAML "
              "are guesses: check them", file=sys.stderr, flush=True)
        return None


def _verify(project: Project, name: str, files, size, starter: int, guesses: int) -> Result:
    """Load what was written as training will, and run its data checks: a wrong guess fails now, in one line."""
    try:
        comp = config.load_competition(project, name)
        config.load_ensemble(project, f"{name}/starter.yaml")
        root = comp.data_path(project)
        paths, labels = data.list_train(comp, root)
        test = data.list_test(comp, root)
        data.check_sample_ids(comp, root, test)
    except EnsError as e:
        raise EnsError(f"wrote {' and '.join(project.relative(f) for f in files)}, but they fail training's checks: "
                       f"{e} (edit the YAML, or fix the data and rerun with --force)") from None
    return Result(files[0], files[1], comp, sorted(set(labels)), len(paths), len(test), size, starter, guesses)


# --------------------------------------------------------------------------------------------- inference
def infer(root: Path, base: Competition, info: dict | None,
          positive_class: str | None) -> tuple[Draft, list[str], list[str], list[str]]:
    """The competition guessed from the files under `root` (and Kaggle's `info`) on top of `base` (its name and
    source), with the training images' labels and paths and the test images' paths."""
    files = scan(root)
    sample = find_sample(files)
    title = (info or {}).get("title") or base.name
    draft = Draft(base.model_copy(update={"title": title, "sample_submission": sample}))
    seen = sorted({PurePosixPath(p).suffix.lower() for p in files.images})
    if not set(seen) <= set(DEFAULT_EXTENSIONS):  # e.g. .tif: training must list them too
        draft.set("the image file types in the data", image_extensions=seen)
    columns, rows = read_csv(root / sample)
    layout, note = guess_folders(files) or guess_csv(files, sample)
    draft.set(note, train=layout)
    paths, labels = data.list_train(draft.comp, root)
    test = guess_test(draft, files, columns, rows, paths)
    target = _target_column(draft.comp, columns)
    draft.set("guessed: the sample submission's other column", target_column=target)
    kaggle_metric = metric_from((info or {}).get("evaluation_metric") or "")
    guess_kind(draft, [r[target] for r in rows], sorted(set(labels)), positive_class, kaggle_metric)
    guess_metric(draft, info)
    guess_submission(draft, info)
    return draft, labels, paths, test


def scan(root: Path) -> Files:
    images, csvs = [], []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = PurePosixPath(Path(folder).relative_to(root).as_posix())
        for n in sorted(names):
            suffix = PurePosixPath(n).suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                images.append(str(here / n))
            elif suffix == ".csv":
                csvs.append(str(here / n))
    if not images:
        raise EnsError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) anywhere under it, so there is no layout "
                       "to guess; point --data at the competition's data folder (or write train: and test_images: "
                       "of competitions/NAME.yaml by hand)")
    return Files(root, images, csvs)


def _depth(path: str) -> int:
    return path.count("/")


def find_sample(files: Files) -> str:
    named = [c for c in files.csvs if re.search("sample|submission", PurePosixPath(c).name, re.IGNORECASE)]
    if not named:
        raise EnsError(f"{files.root}: no sample submission (a CSV named like sample_submission.csv) among "
                       f"{', '.join(files.csvs) or 'no CSVs'}; add it, or write sample_submission by hand")
    return min(named, key=lambda c: (PurePosixPath(c).name.lower() != "sample_submission.csv", _depth(c), c))


def _class_folders(files: Files) -> dict[str, set[str]]:
    """Folder → its subfolders holding images, directly or deeper (a class's images may be split into batch
    folders, as training reads them). A subfolder named like test is a split, not a class (images/train +
    images/test is no class layout), and nothing below it counts."""
    found: dict[str, set[str]] = {}
    for folder in files.folders:
        parts = PurePosixPath(folder).parts if folder != "." else ()
        for depth in range(len(parts)):
            if "test" in parts[depth].lower():
                break
            found.setdefault("/".join(parts[:depth]) or ".", set()).add(parts[depth])
    return found


def guess_folders(files: Files) -> tuple[TrainLayout, str] | None:
    """Class folders: a folder (not the root) with at least 2 subfolders of images, 'train' in its name first,
    then the shallowest: in train/{cat,dog}/{batch1,batch2}/ the classes are cat and dog, not the batches."""
    classes = _class_folders(files)
    found = [f for f, kids in classes.items() if len(kids) >= 2 and f != "."]
    if not found:
        return None
    best = min(found, key=lambda f: ("train" not in PurePosixPath(f).name.lower(), _depth(f), f))
    parent = str(PurePosixPath(best).parent)
    nested = sorted(f for f in found if f != best and str(PurePosixPath(f).parent) == parent)
    if parent == "." and nested:  # {cat,dog}/{batch1,batch2}/ at the top: classes, or batches of classes?
        raise EnsError(f"{files.root}: class folders nested two deep at the top ({best}/ and {nested[0]}/ each hold "
                       "subfolders of images): cannot tell the classes; move them into one folder (train/<class>/) "
                       "or write train: {layout: folders, folder: <the folder whose subfolders are the classes>} by "
                       "hand")
    return (TrainLayout(layout="folders", folder=best),
            f"guessed: {len(classes[best])} class folders of images under {best}/")


def guess_csv(files: Files, sample: str) -> tuple[TrainLayout, str]:
    """A labels CSV: one column naming image files (through a path template), one holding few distinct values."""
    candidates = sorted((c for c in files.csvs if c != sample),
                        key=lambda c: ("train" not in PurePosixPath(c).name.lower(), _depth(c), c))
    for name in candidates:
        columns, rows = read_csv(files.root / name)
        found = _id_column(files, columns, rows)
        if not found:
            continue
        id_column, template, share = found
        label = _label_column(name, columns, rows, id_column)
        if label:
            return (TrainLayout(layout="csv", csv=name, id_column=id_column, label_column=label,
                                path_template=template),
                    f"guessed: {name}'s {id_column} names images ({share:.0%} of the first rows by "
                    f"{template}), its {label} holds {len({r[label] for r in rows})} classes")
    raise EnsError(f"{files.root}: cannot tell how the training images are labelled: no folder of class subfolders, "
                   f"and no CSV ({', '.join(candidates) or 'none besides the sample submission'}) with a column "
                   f"naming image files and a label column; set train (layout, csv, id_column, label_column, "
                   "path_template) by hand")


def _id_column(files: Files, columns: list[str], rows: list[dict]) -> tuple[str, str, float] | None:
    """(column, path template, share of the probed rows it finds) of the column naming the most image files."""
    images = set(files.images)
    best = None
    for column in columns:
        values = [r[column] for r in rows[:PROBE_ROWS] if r[column]]
        if not values:
            continue
        for template in _templates(files, values):
            share = sum(template.format(id=v) in images for v in values) / len(values)
            if share >= MATCH and (best is None or share > best[2]):
                best = (column, template, share)
    return best


def _templates(files: Files, values: list[str]) -> list[str]:
    """`<folder>/{id}` when the values carry an image extension; `<folder>/{id}<ext>` for each extension seen."""
    with_ext = any(PurePosixPath(v).suffix.lower() in IMAGE_EXTENSIONS for v in values)
    out = []
    for folder, exts in sorted(files.extensions.items()):
        prefix = "" if folder == "." else f"{folder}/"
        out += ([prefix + "{id}"] if with_ext else []) + [prefix + "{id}" + e for e in exts]
    return out


def _label_column(csv_name: str, columns: list[str], rows: list[dict], id_column: str) -> str | None:
    """The column with 2..rows/2 distinct values (a label-like name wins); several equally good: refused."""
    fits = [c for c in columns if c != id_column and 2 <= len({r[c] for r in rows}) <= len(rows) / 2]
    named = [c for c in fits if any(w in c.lower() for w in LABEL_WORDS)]
    chosen = named or fits
    if len(chosen) > 1:
        raise EnsError(f"{csv_name}: cannot tell which column holds the labels: {', '.join(chosen)} could each be "
                       "it; write competitions/NAME.yaml by hand with train.label_column set")
    return chosen[0] if chosen else None


def guess_test(draft: Draft, files: Files, columns: list[str], rows: list[dict], train_paths: list[str]) -> list[str]:
    """test_images, test_id and id_column: the folder of images training does not use ('test' in its name first;
    then one shared with the images a labels CSV names, as images/Train_* beside images/Test_*) whose file names
    (or stems) are a column of the sample submission. The test paths."""
    used = {str(PurePosixPath(p).parent) for p in train_paths}
    shared = draft.comp.train.layout == "csv"  # class folders hold training images only
    folders = sorted((f for f in files.folders if (shared or f not in used) and f != "."),
                     key=lambda f: (f in used, "test" not in PurePosixPath(f).name.lower(), _depth(f), f))
    for folder in folders:
        for test_id in ("name", "stem"):
            for column in columns:  # (in a shared folder the test images are those the id column names)
                comp = draft.comp.model_copy(update={"test_images": folder, "test_id": test_id, "id_column": column})
                test = data.list_test(comp, files.root)
                ids = set(data.submission_ids(comp, test))
                values = [r[column] for r in rows]
                if values and sum(v in ids for v in values) >= MATCH * len(values):
                    seen = f"the sample submission's {column} names {len(test)} images of {folder}/"
                    draft.set(f"guessed: {len(test)} images training does not use", test_images=folder)
                    draft.set(f"guessed: {seen} by {'file name' if test_id == 'name' else 'file name sans suffix'}",
                              test_id=test_id)
                    draft.set(f"guessed: {seen}", id_column=column)
                    return test
    looked = ", ".join(f"{f}/" for f in folders) or "no folder of images besides the training images"
    raise EnsError(f"the ids of the sample submission {draft.comp.sample_submission} name no test images (looked in "
                   f"{looked}, by file name and by stem); cannot decide test_images and test_id: set them by hand")


def _target_column(comp: Competition, columns: list[str]) -> str:
    others = [c for c in columns if c != comp.id_column]
    if len(others) != 1:
        raise EnsError(f"{comp.sample_submission}: one target column supported; got {', '.join(others) or 'none'} "
                       f"besides the id column {comp.id_column}")
    return others[0]


def _unit_float(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def _label_reason(values: list[str], classes: list[str], metric: str | None) -> str | None:
    """Why the target column holds labels, or None when it holds a class's probability: numbers in [0, 1] with
    two classes are a probability, unless Kaggle scores labels (accuracy, F1: 0/1 labels are numbers in [0, 1]
    too) or, Kaggle's metric unknown, every value is a class's name."""
    example = f"e.g. '{values[0] if values else ''}'"
    if not (len(classes) == 2 and values and all(_unit_float(v) for v in values)):
        return f"holds labels ({example})"
    if metric in config.LABEL_METRICS:
        return f"holds labels ({example}): Kaggle scores it by {metric}, which compares labels"
    if metric is None and set(values) <= set(classes):
        return (f"holds labels ({example}, each a class's name; if it is a probability, set submission_kind: "
                "probability, positive_class and metric)")
    return None


def guess_kind(draft: Draft, values: list[str], classes: list[str], positive_class: str | None,
               metric: str | None = None) -> None:
    """A probability of one class (numbers in [0, 1], two classes, a metric of probabilities) or a label; which
    class is the positive one. `metric`: Kaggle's, when it said one ens computes."""
    target = draft.comp.target_column
    labels = _label_reason(values, classes, metric)
    if labels:
        if positive_class:
            raise ConfigError(f"--positive-class {positive_class}: the sample submission's {target} {labels}, not "
                              "a class's probability; drop the option")
        draft.set(f"guessed: the sample submission's {target} {labels}", submission_kind="label")
        return
    draft.set(f"guessed: the sample submission's {target} holds numbers in [0, 1] (e.g. {values[0]}) and the "
              "training images have 2 classes", submission_kind="probability")
    if positive_class:
        if positive_class not in classes:
            raise ConfigError(f"--positive-class {positive_class}: not a class (classes: {', '.join(classes)})")
        draft.set("given by --positive-class", positive_class=positive_class)
        return
    positive = [c for c in classes if c.lower() in POSITIVE]
    if len(positive) != 1:
        raise ConfigError(f"cannot tell which of the classes {' and '.join(classes)} the sample submission's {target} "
                          "is the probability of; pass --positive-class CLASS (it sets positive_class)")
    other = next(c for c in classes if c != positive[0])
    draft.set(f"guessed: '{positive[0]}' reads as the positive class, '{other}' as the negative one",
              positive_class=positive[0])


def metric_from(kaggle_metric: str) -> str | None:
    """ens's name of Kaggle's evaluation metric, or None when ens does not compute it."""
    m = kaggle_metric.lower()
    if "accuracy" in m:
        return "accuracy"
    if "log" in m and "loss" in m:
        return "log_loss"
    if "auc" in m or "roc" in m or "receiver operating" in m:
        return "roc_auc"
    if any(w in m for w in ("f1", "f-score", "fscore")) and ("macro" in m or "mean" in m):
        return "f1_macro"
    return None


def guess_metric(draft: Draft, info: dict | None) -> None:
    kaggle_metric = (info or {}).get("evaluation_metric") or ""
    metric = metric_from(kaggle_metric)
    if metric:
        draft.set(f"Kaggle's evaluation metric: {kaggle_metric}", metric=metric)
        return
    said = f"Kaggle's '{kaggle_metric}' is not one ens computes; " if kaggle_metric else ""
    draft.set(f"guessed: {said}set the competition's metric ({METRICS})",
              metric="roc_auc" if draft.comp.submission_kind == "probability" else "accuracy")


def guess_submission(draft: Draft, info: dict | None) -> None:
    """notebook for a code competition; csv without Kaggle's word (`auto` when Kaggle was asked and did not say)."""
    if info is not None:
        kernels = bool(info.get("kernels_only"))
        draft.set("Kaggle: a code competition, submitted as a notebook (limits: notebook:)" if kernels
                  else "Kaggle: submitted as a CSV upload", submission="notebook" if kernels else "csv")
    elif draft.comp.kaggle:
        draft.set("guessed: Kaggle did not say; auto asks Kaggle when submitting", submission="auto")
    else:
        draft.set("guessed: a CSV upload; notebook is for code competitions (auto asks Kaggle)", submission="csv")


def common_size(root: Path, paths: list[str]) -> tuple[int, int] | None:
    """[height, width] of most of ~50 images spread over `paths`: PIL reads the header only (no decode)."""
    from PIL import Image

    sizes = Counter()
    for p in paths[::max(1, len(paths) // SIZE_SAMPLE)][:SIZE_SAMPLE]:
        try:
            with Image.open(root / p) as im:
                width, height = im.size
        except Exception:  # noqa: BLE001 - damaged, or a decompression bomb: training's checks name it
            continue
        sizes[(height, width)] += 1
    return sizes.most_common(1)[0][0] if sizes else None


def starter_size(image_size: tuple[int, int] | None) -> int:
    """224 px, or the images' smaller side when smaller (upscaling adds no detail), at least 32."""
    return 224 if image_size is None else max(32, min(224, min(image_size)))


# --------------------------------------------------------------------------------------------- the YAML text
def _scalar(value) -> str:
    """`value` as YAML on one line (strings quoted where YAML would read them otherwise, e.g. '1' or 'yes')."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).removesuffix("...\n").strip()


def _line(key: str, value, note: str = "", indent: int = 0) -> str:
    text = f"{'  ' * indent}{key}: {_scalar(value)}"
    return f"{text:<32}  # {note}" if note else text


def competition_yaml(draft: Draft, expected: Expected) -> str:
    c, notes = draft.comp, draft.notes
    source = f"Kaggle's competition {c.kaggle}" if c.kaggle else f"the folder {c.data_dir}"
    lines = [f"# {c.title}: written by `ens init` from {source}.",
             "# Review the `# guessed:` lines (the competition's Data and Evaluation pages say), then train the "
             f"starter: ens run {c.name}/starter.yaml",
             _line("title", c.title)]
    lines += [_line("kaggle", c.kaggle)] if c.kaggle else [_line("data_dir", c.data_dir)]
    lines += ["train:", _line("layout", c.train.layout, notes.get("train", ""), 1)]
    keys = ("folder",) if c.train.layout == "folders" else ("csv", "id_column", "label_column", "path_template")
    lines += [_line(k, getattr(c.train, k), indent=1) for k in keys]
    if tuple(c.image_extensions) != DEFAULT_EXTENSIONS:
        lines.append(_line("image_extensions", c.image_extensions, notes.get("image_extensions", "")))
    for key in ("test_images", "test_id", "sample_submission", "id_column", "target_column", "submission_kind",
                "positive_class", "metric", "submission"):
        if getattr(c, key) is not None:
            lines.append(_line(key, getattr(c, key), notes.get(key, "")))
    if c.submission != "csv":  # a code competition's limits: the notebook's runtime estimate is checked against them
        lines += ["notebook:                         # guessed: Kaggle's usual limits; the competition's Code "
                  "Requirements say",
                  _line("runtime_hours", c.notebook.runtime_hours, indent=1),
                  _line("accelerator", c.notebook.accelerator, indent=1),
                  _line("hidden_test_images", expected.test_images, "guessed: the public count; the hidden set is "
                        "often larger (its Data page says)", 1)]
    lines += [_line("split", c.split.model_dump(), "fixed: every member of every ensemble is validated on these"),
              _line("cv", c.cv.model_dump(exclude_none=True), "the folds of ensembles with validation: cv"),
              _line("expected", expected.model_dump(mode="json", exclude_none=True),
                    "from the data (image_size: [height, width] of most images)")]
    return "\n".join(lines) + "\n"


def starter_member(name: str, size: int, pretrained: bool) -> dict:
    member = {"name": "convnext", "arch": ARCH, "pretrained": pretrained, "size": size, "epochs": 5, "lr": 2e-3,
              "decode": True}
    return {"competition": name, "members": [member]}


def starter_header(name: str, size: int, pretrained: bool) -> str:
    weights = "from timm's ImageNet-22k weights" if pretrained else "from scratch"
    why = "" if size == 224 else " (the images' smaller side)"
    return (f"# The starter ensemble of {name}, written by `ens init`: one ConvNeXt-Tiny {weights}\n"
            f"# at {size} px{why} for 5 epochs, the images decoded once into the cache (decode: true).\n"
            f"# Train it and write the submission: ens run {name}/starter.yaml\n"
            "# Then add members (other architectures, sizes, seeds): their average usually beats the best of them.\n")


def summary_lines(project: Project, r: Result) -> list[str]:
    """What `ens init` found and wrote, and the next command."""
    c = r.comp
    layout = (f"class folders under {c.train.folder}/" if c.train.layout == "folders"
              else f"labels CSV {c.train.csv} ({c.train.id_column} → {c.train.path_template}, "
                   f"labels in {c.train.label_column})")
    kind = f"probability of '{c.positive_class}'" if c.submission_kind == "probability" else "label"
    size = f"{r.image_size[0]}x{r.image_size[1]} (height x width)" if r.image_size else "unknown (no readable image)"
    return [f"wrote {project.relative(r.competition_file)} and {project.relative(r.ensemble_file)} "
            f"({r.guesses} values marked `# guessed:`: review them)",
            f"  train: {layout}: {len(r.classes)} classes, {r.train_images} images",
            f"  test: {r.test_images} images in {c.test_images}/, ids by {c.test_id}",
            f"  submission: {c.sample_submission} columns {c.id_column}, {c.target_column} ({kind}); metric "
            f"{c.metric}; submitted as {c.submission}",
            f"  images: {size}; the starter trains {ARCH} at {r.starter_size} px",
            f"next: ens run {c.name}/starter.yaml"]
