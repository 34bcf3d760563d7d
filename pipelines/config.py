"""Competitions and ensembles as YAML: pydantic models, loading, `defaults:` merging and `key=value` overrides.

Knows nothing of torch: every verb that only reads configs stays fast.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_validator, model_validator

from .errors import ConfigError

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

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root))
        except ValueError:
            return str(path)


# --------------------------------------------------------------------------------------------- competitions
class Split(Strict):
    """The one validation split every member of every ensemble of a competition is scored on."""

    valid_pct: float = Field(0.2, gt=0, lt=1)
    seed: int = 42
    stratified: bool = True


class CrossValidation(Strict):
    """The k folds of a competition's cross-validated ensembles (`validation: cv`): fixed per competition, like the
    holdout split, so every member's out-of-fold probabilities line up row by row. With `group_column`, the
    images of one group (a plant, a patient, a scene) are kept in one fold: group k-fold."""

    folds: int = Field(5, ge=2)
    seed: int = 42
    stratified: bool = True
    group_column: Optional[str] = None  # a column of the labels CSV (train.csv), or of groups_csv
    groups_csv: Optional[str] = None  # for class-folder layouts: a CSV of train.id_column (file names) and group_column

    @model_validator(mode="after")
    def _groups_named(self):
        if self.groups_csv and not self.group_column:
            raise ValueError("groups_csv needs group_column: the column that holds each image's group")
        return self


class TrainLayout(Strict):
    """Class folders (`train_images/<label>/*.jpg`) or a labels CSV with a path template."""

    layout: Literal["folders", "csv"] = "folders"
    folder: str = "train_images"
    csv: Optional[str] = None
    id_column: str = "image_id"
    label_column: str = "label"
    path_template: str = "train_images/{id}"

    @model_validator(mode="after")
    def _csv_named(self):
        if self.layout == "csv" and not self.csv:
            raise ValueError("layout 'csv' needs `csv:` (the labels file, relative to the data folder)")
        return self


class Expected(Strict):
    """Facts copied from the competition's page (its Data tab), for what `ens plan` can say before the data is
    downloaded: the class count sizes the networks' heads (parameters, FLOPs), the image counts give time
    estimates and the decoded copies' disk. Once the data is there it governs; the plan notes a disagreement."""

    classes: Optional[int] = Field(None, ge=2)
    train_images: Optional[int] = Field(None, ge=1)  # labelled images, validation split included
    test_images: Optional[int] = Field(None, ge=1)
    image_size: Optional[tuple[int, int]] = None  # [height, width] of most images, as shown to a reader

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError("image_size is [height, width] in pixels, both positive")
        return v


class Notebook(Strict):
    """A code competition's limits: the submission is a notebook that Kaggle re-runs offline on a hidden test set
    (which replaces the public test images and sample submission at scoring)."""

    runtime_hours: float = Field(9.0, gt=0)  # the competition's limit on the notebook's run
    accelerator: Literal["none", "gpu"] = "gpu"  # what the notebook runs on (Kaggle's `enable_gpu`)
    hidden_test_images: Optional[int] = Field(None, ge=1)  # the hidden test set's size, from the competition's page
    output: str = "submission.csv"  # the file the notebook writes, which Kaggle scores


class Competition(Strict):
    name: str
    title: str = ""
    data_dir: Optional[str] = None  # default cache/data/<name>
    builtin: Optional[Literal["digits"]] = None  # built locally on first use instead of downloaded
    train: TrainLayout = TrainLayout()
    test_images: str = "test_images"
    test_id: Literal["name", "stem"] = "name"  # a test image's id in the submission: file name or name sans suffix
    image_extensions: list[str] = [".jpg", ".jpeg", ".png"]
    # training images PIL cannot decode (truncated, not an image): stop (`error`), or train without them (`skip`);
    # a damaged test image is always an error (the submission needs every id)
    damaged_images: Literal["error", "skip"] = "error"
    sample_submission: str = "sample_submission.csv"
    id_column: str = "image_id"
    target_column: str = "label"
    # what the target column holds: the predicted label, or the probability of `positive_class` (real/fake
    # competitions are often scored on a probability)
    submission_kind: Literal["label", "probability"] = "label"
    positive_class: Optional[str] = None
    metric: Literal["accuracy", "log_loss", "f1_macro", "roc_auc"] = "accuracy"
    split: Split = Split()
    cv: CrossValidation = CrossValidation()  # the folds of ensembles with `validation: cv`
    solution: Optional[str] = None  # local answers (id and target columns), for competitions scored here
    kaggle: Optional[str] = None  # competition slug
    # how Kaggle takes a submission: a CSV upload, or a notebook run offline (a code competition, limits in
    # `notebook:`); auto: ask Kaggle (its `isKernelsSubmissionsOnly`) when submitting
    submission: Literal["csv", "notebook", "auto"] = "csv"
    notebook: Notebook = Notebook()
    expected: Optional[Expected] = None  # facts from the competition's page, for `ens plan` before the download

    @model_validator(mode="after")
    def _probability_needs_a_class(self):
        if self.submission_kind == "probability" and not self.positive_class:
            raise ValueError("submission_kind 'probability' needs positive_class: the class whose probability is submitted")
        return self

    @model_validator(mode="after")
    def _groups_readable(self):
        if self.cv.group_column and not self.cv.groups_csv and self.train.layout != "csv":
            raise ValueError("cv.group_column with class folders needs cv.groups_csv: a CSV of image file names "
                             f"({self.train.id_column}) and {self.cv.group_column}")
        return self

    def data_path(self, project: Project) -> Path:
        return project.root / (self.data_dir or f"cache/data/{self.name}")


# --------------------------------------------------------------------------------------------- members
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


class AugTransforms(Strict):
    """fastai's `aug_transforms` arguments, with fastai's names and defaults (a test checks they match), limited
    to the ranges where fastai's transforms mean something (its Brightness takes the logit of 0.5·(1 ± lighting),
    its Zoom divides by the zoom and asserts min ≤ max, its Warp's magnitude is a fraction of the half-size)."""

    mult: float = Field(1.0, ge=0)  # multiplies max_rotate, max_lighting and max_warp
    do_flip: bool = True
    flip_vert: bool = False
    max_rotate: float = Field(10.0, ge=0, le=180)  # degrees, either way
    min_zoom: float = Field(1.0, gt=0)
    max_zoom: float = Field(1.1, ge=1)
    max_lighting: float = Field(0.2, ge=0, lt=1)
    max_warp: float = Field(0.2, ge=0, lt=1)
    p_affine: float = Field(0.75, ge=0, le=1)
    p_lighting: float = Field(0.75, ge=0, le=1)
    mode: Literal["bilinear", "nearest", "bicubic"] = "bilinear"
    pad_mode: Literal["zeros", "border", "reflection"] = "reflection"
    align_corners: bool = True
    batch: bool = False
    min_scale: float = Field(1.0, gt=0, le=1)  # of the image area (RandomResizedCropGPU); 1: no random crop

    @model_validator(mode="after")
    def _meaningful(self):
        if self.min_zoom > self.max_zoom:
            raise ValueError(f"min_zoom {self.min_zoom:g} is above max_zoom {self.max_zoom:g}; "
                             "lower min_zoom or raise max_zoom")
        for name in ("max_lighting", "max_warp"):  # fastai multiplies them by `mult` before use
            if getattr(self, name) * self.mult >= 1:
                raise ValueError(f"{name} × mult = {getattr(self, name):g} × {self.mult:g} must stay below 1 "
                                 f"(fastai uses the product); lower {name} or mult")
        return self


class ItemResize(Strict):
    """The per-image resize before batching (fastai's item_tfms `Resize`); size defaults to the member's size."""

    size: Optional[Size] = None
    method: Literal["squish", "crop", "pad"] = "squish"


class Prepare(Strict):
    """A resized copy of the images, built once in the cache: on machines with few CPU cores, decoding and
    resizing full-size JPEGs every epoch makes training CPU-bound (Road to the Top: Kaggle's 2 vCPUs)."""

    max_size: int = Field(ge=8)  # the longer side, in pixels (fastai's resize_images)
    quality: int = Field(90, ge=1, le=100)  # JPEG quality of the copies


class TTA(Strict):
    """Test-time augmentation: the plain pass, `n` augmented passes blended with it by `beta` (fastai's `tta`), and
    named deterministic `views` — `hflip`, `vflip`, `{scale: 1.15}` (the centre 1/1.15 zoomed to the size),
    `{crops: 0.875}` (the mean of five crops of that share: four corners and the centre). The TTA probability is
    the mean of the beta blend and the views; each view's probabilities are cached apart (`ens ablate` says which
    help; a subset of cached views is derived without predicting)."""

    n: int = Field(4, ge=0)  # augmented passes; the plain pass is always made too
    beta: float = Field(0.25, ge=0, le=1)  # weight of the plain pass in the TTA blend (fastai's meaning)
    views: list[Union[Literal["hflip", "vflip"], "ScaleView", "CropsView"]] = []

    @property
    def view_names(self) -> list[str]:
        """Canonical names ('hflip', 'scale1.15', 'crops0.875'), sorted, without repeats."""
        return sorted({v if isinstance(v, str) else v.name for v in self.views})


class ScaleView(Strict):
    scale: float = Field(gt=1, le=2)

    @property
    def name(self) -> str:
        return f"scale{self.scale:g}"


class CropsView(Strict):
    crops: float = Field(gt=0.5, lt=1)

    @property
    def name(self) -> str:
        return f"crops{self.crops:g}"


class Loss(Strict):
    """The training loss: fastai's cross-entropy, with label smoothing (`LabelSmoothingCrossEntropyFlat`) when set."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)  # eps: the share of each target spread over the other classes


class Mix(Strict):
    """fastai's MixUp or CutMix: each training batch mixed with a shuffled copy of itself, by a share drawn from
    Beta(alpha, alpha) (whole images blended, or a rectangle pasted), the targets mixed alike."""

    alpha: float = Field(0.4, gt=0)


class EMA(Strict):
    """An exponential moving average of the weights (timm's ModelEmaV3), updated after every optimiser step and used
    for validation, TTA and the kept weights. `warmup` ramps the decay up over the first steps (timm's
    `use_warmup`), which keeps it honest on short fine-tunes: with a fixed 0.999 the average of a 300-step run
    would still be mostly the initial weights."""

    decay: float = Field(0.999, gt=0, lt=1)
    warmup: bool = True


class Average(Strict):
    """Checkpoint averaging, EMA's alternative: the member's weights are the mean of its weights at the end of
    each of its last `epochs` epochs (validation during training sees the live weights; TTA and the kept weights
    the average)."""

    epochs: int = Field(3, ge=2)


class Pseudo(Strict):
    """Pseudo-labels from a cached ensemble (the teacher): its confident test predictions join the member's
    training images with their predicted class — those whose blended probability reaches `threshold`, or the
    `top` share of each predicted class, most confident first. Leak-free: a holdout member takes a holdout
    teacher's test predictions; a cross-validated member's fold f takes the teacher's fold-f models' (which never
    saw fold f's images), its refit the teacher's own."""

    teacher: str  # an ensemble YAML of the same competition, every member cached (`ens run` it first)
    threshold: Optional[float] = Field(None, gt=0, le=1)
    top: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_rule(self):
        if (self.threshold is None) == (self.top is None):
            raise ValueError("give pseudo-labels one rule: threshold (e.g. 0.9) or top (a share per class, e.g. 0.3)")
        return self


class Distill(Strict):
    """Distillation from a cached ensemble (the teacher): every test image joins the member's training images with
    the teacher's probabilities (sharpened or softened by `temperature`) as its target, its loss weighed by
    `weight` against the labelled images' cross-entropy. The teacher's test predictions come from models that
    never saw the member's validation images (as for `pseudo`); its probabilities on training images would have
    (a cross-validated teacher's out-of-fold rows were predicted by models trained on the member's validation
    images), so they are not used. Soft targets travel with the decoded batches: needs `decode: true`."""

    teacher: str
    weight: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)


class TuneRange(Strict):
    """A numeric search range: integers when low and high (and step) are integers, else floats."""

    low: Union[int, float]
    high: Union[int, float]
    log: bool = False  # sample on a log scale (needs low > 0)
    step: Union[int, float, None] = None  # a grid step (not with log)

    @model_validator(mode="after")
    def _sound(self):
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.step is not None:
            raise ValueError("log and step do not combine; drop one")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be positive (got {self.step})")
        return self

    @property
    def is_int(self) -> bool:
        ints = [v for v in (self.low, self.high, self.step) if v is not None]
        return all(isinstance(v, int) and not isinstance(v, bool) for v in ints)


class Tune(Strict):
    """`ens tune`'s search: `trials` trials of `epochs` epochs on a stratified `fraction` of the training images
    (the validation images stay the competition's); `space` maps member field paths (`lr`,
    `aug_transforms.max_rotate`) to a list of choices or a {low, high, log?, step?} range."""

    trials: int = Field(10, ge=1)
    epochs: int = Field(2, ge=1)
    fraction: float = Field(0.25, gt=0, le=1)
    pruner: Literal["median", "asha", "none"] = "median"  # stop trailing trials: below the median of earlier ones at the same epoch, or successive halving
    space: dict[str, Union[TuneRange, list[Any]]] = Field(min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _entries(cls, v):
        if not isinstance(v, dict):
            return v  # pydantic says what is wrong
        out = {}
        for key, spec in v.items():
            if isinstance(spec, list) and spec:
                out[key] = spec
            elif isinstance(spec, dict):
                try:
                    out[key] = TuneRange.model_validate(spec)
                except ValidationError as e:
                    first = e.errors()[0]
                    problem = (f"unknown key '{first['loc'][0]}' (a range takes low, high, log, step)"
                               if first["type"] == "extra_forbidden" else
                               f"{'.'.join(map(str, first['loc']))} {first['msg']}".strip().removeprefix("Value error, "))
                    raise ValueError(f"space key '{key}': {problem}") from None
            else:
                raise ValueError(f"space key '{key}': give a list of choices or a range {{low, high, log?, step?}}, "
                                 f"not {spec!r}")
        return out


# member fields a search may not vary: trials set epochs (and drop stages) themselves; the rest change no result
TUNE_FIXED = ("name", "tune", "epochs", "stages", "weight", "num_workers", "keep_model", "gpu_memory", "deterministic",
              "decode", "compile")


def member_field(path: str):
    """The pydantic FieldInfo a dotted member field path (`aug_transforms.max_rotate`) names, or None."""
    model, info = Member, None
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = next((t for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return info


def _member_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        sub = next((t for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
                    if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if sub is not None:
            out += _member_paths(sub, f"{prefix}{name}.")
    return out


def check_tune_space(tune: Tune) -> None:
    """Every space key a member field that a trial may vary, every bound and choice a value that field takes."""
    from pydantic import TypeAdapter

    for key, spec in tune.space.items():
        info = member_field(key)
        if info is None:
            close = difflib.get_close_matches(key, _member_paths(Member), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "name a member field, e.g. lr or aug_transforms.max_rotate"
            raise ValueError(f"space key '{key}' is not a member field; {hint}")
        if key.split(".")[0] in TUNE_FIXED:
            raise ValueError(f"space key '{key}' cannot be tuned (trials run tune.epochs epochs; "
                             f"{', '.join(TUNE_FIXED)} are fixed)")
        field_type = TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)
        if isinstance(spec, TuneRange):
            if info.annotation is int and not spec.is_int:
                raise ValueError(f"space key '{key}' takes integers; give low and high (and step) as integers")
            values = [spec.low, spec.high]
        else:
            values = spec
        for v in values:
            try:
                field_type.validate_python(v)
            except ValidationError as e:
                problem = e.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"space key '{key}': {v!r} is not a value of that field ({problem})") from None


class Member(Strict):
    name: str
    arch: str
    pretrained: Union[bool, str] = True  # true: timm's/torchvision's weights; a path: a local weights file
    size: Size = 224
    epochs: int = Field(10, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    resize: ItemResize = ItemResize()
    prepare: Optional[Prepare] = None  # read a resized copy of the data instead of the originals
    # read batches from a uint8 copy decoded once at each pre-size (cache/decoded/): no JPEG decoded after the
    # first build, the augmentation on the batch. The same pixels as the JPEG path, so kept out of the cache key
    decode: bool = False
    aug_transforms: Optional[AugTransforms] = AugTransforms()
    stages: Optional[list[tuple[Size, int]]] = None  # progressive resizing: [[size, epochs], ...], one schedule
    freeze_epochs: int = Field(1, ge=0)  # fine_tune's frozen epochs (pretrained bodies only)
    tta: TTA = TTA()
    seed: int = 42
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16/fp16 on CUDA, fp32 on CPU
    weight: float = Field(1.0, ge=0)  # weight in the ensemble average
    # below: how to run, not what is computed; kept out of the cache key
    num_workers: Optional[int] = Field(None, ge=0)
    keep_model: bool = True  # keep the trained weights (cache/<c>/models/): a TTA change then costs prediction only
    gpu_memory: str = "7GiB"  # the memory budget on CUDA: micro-batches and gradient accumulation are fitted to it
    # (7 GiB: what an "8 GB" card offers once the CUDA context has its share; see README, "an 8 GB GPU")
    # bit-exact reruns (true) or cudnn.benchmark's speed (false); None: exact on the CPU, fast on CUDA. It changes
    # the last bits of the results, not what is learned, so it is kept out of the cache key (RUN_ONLY)
    deterministic: Optional[bool] = None
    # on CUDA: torch.compile the model (compiles again for every stage size; the first epochs pay for it)
    compile: bool = False
    tune: Optional[Tune] = None  # `ens tune`'s search space and budget
    loss: Optional[Loss] = None  # label smoothing
    mixup: Optional[Mix] = None  # both mixup and cutmix: each batch one or the other, half the batches each
    cutmix: Optional[Mix] = None
    ema: Optional[EMA] = None
    average: Optional[Average] = None  # the mean of the last epochs' weights (not with ema)
    pseudo: Optional[Pseudo] = None  # confident test predictions of a cached ensemble as extra training images
    distill: Optional[Distill] = None  # a cached ensemble's test probabilities as soft targets

    @field_validator("tune", mode="wrap")
    @classmethod
    def _tune_space(cls, v, handler):
        tune = handler(v)
        if tune is not None:
            check_tune_space(tune)
        return tune

    @model_validator(mode="after")
    def _tuned_augmentation_exists(self):
        if self.tune and self.aug_transforms is None and any(k.startswith("aug_transforms.") for k in self.tune.space):
            raise ValueError("tune.space varies aug_transforms fields but aug_transforms is null; set aug_transforms")
        return self

    @field_validator("pretrained")
    @classmethod
    def _weights_file_exists(cls, v, info):
        # checked where a YAML is loaded (load_ensemble asks for it): a member read back from a cache entry
        # (`ens eval` on kept weights) needs no weights file
        if isinstance(v, str) and (info.context or {}).get("check_files"):
            path = Path(v).expanduser()  # as models.timm_weights_kwargs reads it: relative to the current folder
            if not path.is_file():
                state = "is a folder" if path.is_dir() else "does not exist"
                raise ValueError(f"weights file {v} {state} (looked for {path.absolute()}); give an existing "
                                 "weights file (relative to the current folder, or ~/...), or true or false")
        return v

    @field_validator("gpu_memory")
    @classmethod
    def _memory_size(cls, v):
        parse_bytes(v)
        return v

    @field_validator("stages")
    @classmethod
    def _stages_not_empty(cls, v):
        if v is not None and not v:
            raise ValueError("stages must list at least one [size, epochs] pair (or be left out)")
        if v is not None and any(e < 1 for _, e in v):
            raise ValueError("every stage needs at least one epoch")
        return v

    @model_validator(mode="after")
    def _one_average(self):
        if self.ema and self.average:
            raise ValueError("ema and average both replace the weights by an average; keep one")
        if self.average and self.average.epochs > self.total_epochs:
            raise ValueError(f"average.epochs {self.average.epochs} is more than the member's {self.total_epochs} "
                             "epochs; lower it")
        return self

    @model_validator(mode="after")
    def _distill_needs(self):
        if self.distill is None:
            return self
        if not self.decode:
            raise ValueError("distill needs decode: true (the soft targets travel with the decoded batches)")
        if self.mixup or self.cutmix or self.pseudo:
            raise ValueError("distill does not combine with mixup, cutmix or pseudo; keep one")
        return self

    @model_validator(mode="after")
    def _decoded_copy_is_fixed(self):
        if self.decode and self.resize.method != "squish":
            raise ValueError(f"decode: true stores one fixed image per file, but resize.method {self.resize.method} "
                             "draws a random window per training epoch; use resize.method squish or drop decode")
        return self

    @model_validator(mode="after")
    def _prepared_copy_large_enough(self):
        if self.prepare:
            sizes = [self.resize.size] if self.resize.size else [s for s, _ in self.stage_plan]
            largest = max(max(s) if isinstance(s, tuple) else s for s in sizes)
            if largest > self.prepare.max_size:
                raise ValueError(f"prepare.max_size {self.prepare.max_size} is below the size {largest} the member "
                                 "reads: the copy would be upscaled; raise max_size or drop prepare")
        return self

    @property
    def stage_plan(self) -> list[tuple[Size, int]]:
        """(size, epochs) per stage; without `stages`, one stage at `size` for `epochs`."""
        return list(self.stages) if self.stages else [(self.size, self.epochs)]

    @property
    def final_size(self) -> Size:
        return self.stage_plan[-1][0]

    @property
    def presizes(self) -> list[tuple[int, int]]:
        """(height, width) of the items per distinct stage, before the batch augmentation: `resize.size` where a
        batch augmentation brings items to the stage size, else the stage size (`data.dataloaders`)."""
        out = []
        for size, _ in self.stage_plan:
            pre = self.resize.size if self.resize.size is not None and self.aug_transforms is not None else size
            hw = (pre, pre) if isinstance(pre, int) else (int(pre[0]), int(pre[1]))
            if hw not in out:
                out.append(hw)
        return out

    @property
    def total_epochs(self) -> int:
        return sum(e for _, e in self.stage_plan)

    # fields that do not change a member's predictions
    RUN_ONLY: ClassVar[tuple] = ("name", "weight", "num_workers", "keep_model", "gpu_memory", "tune",
                                 "deterministic", "decode", "compile")

    @property
    def tta_passes(self) -> int:
        """The augmented TTA passes worth making: none when they would all equal the plain pass (no batch
        augmentation, and an item resize that is not a random crop)."""
        if self.aug_transforms is None and self.resize.method != "crop":
            return 0
        return self.tta.n

    @property
    def classical(self) -> bool:
        """Features and a scikit-learn classifier (`classical.py`), no network."""
        return is_classical(self.arch)

    def recipe(self) -> str:
        """The training recipe's options in a few words ('smooth 0.1, mixup 0.4 | cutmix 1, EMA 0.999'), '' of none."""
        parts = []
        if self.loss is not None and self.loss.label_smoothing:
            parts.append(f"smooth {self.loss.label_smoothing:g}")
        mixes = [f"{name} {mix.alpha:g}" for name, mix in (("mixup", self.mixup), ("cutmix", self.cutmix)) if mix]
        if mixes:
            parts.append(" | ".join(mixes))
        if self.ema is not None:
            parts.append(f"EMA {self.ema.decay:g}" + ("" if self.ema.warmup else " (no warm-up)"))
        if self.average is not None:
            parts.append(f"average of the last {self.average.epochs} epochs")
        if self.pseudo is not None:
            rule = f"≥ {self.pseudo.threshold:g}" if self.pseudo.threshold is not None else f"top {self.pseudo.top:g}"
            parts.append(f"pseudo {rule} of {self.pseudo.teacher}")
        if self.distill is not None:
            parts.append(f"distill {self.distill.teacher} ×{self.distill.weight:g}, T {self.distill.temperature:g}")
        return ", ".join(parts)

    def train_fields(self) -> dict[str, Any]:
        """What changes the trained weights, canonical: equivalent spellings give equal dicts (a square [h, h]
        size is h; `resize.size` that changes nothing is dropped; `freeze_epochs` of a from-scratch body too).
        The architecture name, the precision and a weights file are resolved by `cache.train_key`."""
        d = self.model_dump(mode="json", exclude={*self.RUN_ONLY, "tta"})
        d["stages"], d["size"], d["epochs"] = [[_square(s), e] for s, e in self.stage_plan], None, None
        presize = _square(self.resize.size) if self.resize.size is not None else None
        if self.aug_transforms is None or all(presize == s for s, _ in d["stages"]):
            presize = None  # without batch augmentation the stage size governs (`data.dataloaders`)
        d["resize"] = {"size": presize, "method": self.resize.method}
        if self.pretrained is False:
            d["freeze_epochs"] = None
        d.pop("pseudo", None)  # what they add is in the data fingerprint (`run.member_data`): images and targets
        d.pop("distill", None)
        if d.get("loss") == {"label_smoothing": 0.0}:
            d["loss"] = None  # no smoothing is the default loss
        d["pixels"] = PIXELS  # how images become pixels (the JPEG path and decoded copies alike)
        # unset optional features leave no trace: adding one to ens does not retrain every cached member
        return {k: v for k, v in d.items() if v is not None or k == "aug_transforms"}

    def tta_fields(self) -> dict[str, Any]:
        """What changes the predictions of given weights: the augmented passes (beta only when there are any)."""
        n = self.tta_passes
        views = {"views": self.tta.view_names} if self.tta.views else {}  # none leave no trace in older keys
        seeding = {"seeding": TTA_SEEDING} if n else {}  # random passes: how their draws are seeded
        return {"n": n, "beta": self.tta.beta if n else None, **views, **seeding}

    def key_fields(self) -> dict[str, Any]:
        """Everything that changes the predictions, canonical (meta.json keeps it; `cache.member_key` hashes it)."""
        return self.train_fields() | {"tta": self.tta_fields()}


# the random TTA passes of each split start from a seed of their own (the member's seed + 1 for validation, + 2 for
# the test images), so a notebook that predicts only the test images draws exactly what `ens run` drew
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


COMBINE_METHODS = ("mean", "greedy", "hill_climb", "rank", "power", "stack")
LEARNED = ("greedy", "hill_climb", "stack")  # blends whose weights are learned from the validation probabilities


class Combine(Strict):
    """How the members' probabilities become one: fixed blends (`mean` with the members' weights, `rank`, `power`)
    or learned ones (`greedy` selection with replacement, `hill_climb` with negative weights, `stack`: a logistic
    regression on the members' log-probabilities), learned on the validation (or out-of-fold) rows and scored by
    nested cross-validation."""

    method: Literal[COMBINE_METHODS] = "mean"
    power: float = Field(2.0, gt=0)  # power averaging's exponent
    rounds: int = Field(100, ge=1)  # greedy selection's and hill climbing's rounds
    allow_negative: bool = True  # hill climbing may subtract a member
    C: float = Field(1.0, gt=0)  # stacking's inverse L2 strength

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v):
        return {"method": v} if isinstance(v, str) else v

    @property
    def learned(self) -> bool:
        return self.method in LEARNED


class Ensemble(Strict):
    competition: str
    description: str = ""
    probs: Literal["tta", "plain"] = "tta"  # which probabilities are averaged
    # holdout: every member trains once, validated on the competition's split; cv: one model per fold of the
    # competition's `cv`, the blend chosen and scored on the out-of-fold probabilities of every training image
    validation: Literal["holdout", "cv"] = "holdout"
    # cv only: the test predictions from the mean of the fold models (none), or from one more model per member
    # trained on every training image (full)
    refit: Literal["none", "full"] = "none"
    combine: Combine = Combine()
    defaults: dict[str, Any] = {}
    members: list[Member] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self):
        seen = set()
        for m in self.members:
            if m.name in seen:
                raise ValueError(f"member name '{m.name}' is used twice; give each member its own name")
            seen.add(m.name)
        return self

    @model_validator(mode="after")
    def _refit_needs_folds(self):
        if self.refit != "none" and self.validation != "cv":
            raise ValueError("refit: full needs validation: cv (a holdout member already predicts the test images)")
        return self


# --------------------------------------------------------------------------------------------- loading
def _yaml_problem(e: yaml.YAMLError, text: str) -> tuple[str, str]:
    """(' line N', problem) of a parser error, on one line: the parser's own message spans lines (a context block
    with its mark, then the problem with its mark, each quoting the source line)."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: no line mark, a position
        line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
        what = (f"character #x{e.character:04x}" if isinstance(e.character, int) else f"byte {e.character!r}")
        return (f" line {line}" if line else ""), f"unacceptable {what}: {e.reason}"
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    problem = getattr(e, "problem", None) or str(e)
    if context:
        start = getattr(e, "context_mark", None)
        problem += f" {context}" + (f" started at line {start.line + 1}" if start and mark and start.line != mark.line else "")
    return (f" line {mark.line + 1}" if mark else ""), " ".join(problem.split())


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}); "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e, text)
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that `loc` (minus its last part) points into, for did-you-mean hints."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            for inner in (c, *getattr(c, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
            else:
                continue
            break
        else:
            return []
    return list(model.model_fields)


def one_line_error(path: Path, err: ValidationError, model: type[BaseModel], rename=lambda loc: loc) -> ConfigError:
    """The first pydantic error as `file: field.path: problem; fix`."""
    first = err.errors()[0]
    loc = rename(tuple(first["loc"]))
    # one value in defaults fails once per member: count it once
    distinct = len({(rename(tuple(e["loc"])), e["msg"]) for e in err.errors()})
    more = f" (and {distinct - 1} more)" if distinct > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _fields_at(model, tuple(first["loc"]))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        return ConfigError(f"{path}: {_loc(loc)}: unknown key; {hint}{more}")
    if first["type"] == "missing":
        return ConfigError(f"{path}: {_loc(loc)}: required, add it{more}")
    got = first.get("input")
    got = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    msg = first["msg"].removeprefix("Value error, ")
    return ConfigError(f"{path}: {_loc(loc) or 'top level'}: {msg}{got}{more}")


def load_competition(project: Project, name: str) -> Competition:
    path = project.competitions / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in project.competitions.glob("*.yaml"))
        raise ConfigError(f"{project.relative(path)}: no such competition '{name}'; known: {', '.join(known) or 'none'}")
    raw = read_yaml(path)
    raw.setdefault("name", name)
    try:
        return Competition.model_validate(raw)
    except ValidationError as e:
        raise one_line_error(project.relative(path), e, Competition) from None


def resolve_ensemble_path(project: Project, spec: str) -> Path:
    """`paddy/final.yaml` resolves under ensembles/; a plain path works too."""
    for candidate in (Path(spec), project.ensembles / spec, project.ensembles / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{spec}: no such ensemble (looked in the current folder and {project.relative(project.ensembles)}/); "
                      "`ls ensembles/*/` shows the known ones")


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(raw: dict, overrides: list[str], source: str = "command line") -> dict:
    """`a.b=value` (value parsed as YAML) set into `raw`; `members.NAME.field=value` targets one member by name,
    `members.*.field=value` every member (their own values included, which `defaults.field` would not beat)."""
    raw = deep_merge(raw, {})
    expanded = []
    for item in overrides:
        if item.startswith("members.*."):
            names = [m.get("name", i) for i, m in enumerate(raw.get("members") or []) if isinstance(m, dict)]
            expanded += [f"members.{n}.{item[len('members.*.'):]}" for n in names]
        else:
            expanded.append(item)
    for item in expanded:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: '{item}': an override is key=value, e.g. defaults.epochs=1 or members.NAME.lr=0.01")
        value = yaml.safe_load(text) if text else None
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # members: pick by name, else by index
                names = [m.get("name") for m in node if isinstance(m, dict)]
                if part in names:
                    node = node[names.index(part)]
                elif part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise ConfigError(f"{source}: '{key}': no member named '{part}'; members: {', '.join(map(str, names))}")
            else:
                if not isinstance(node.get(part, {}), (dict, list)):
                    raise ConfigError(f"{source}: '{key}': '{'.'.join(parts[:i + 1])}' is not a mapping")
                node = node.setdefault(part, {})
        if isinstance(node, list):
            raise ConfigError(f"{source}: '{key}': name a member field, e.g. members.NAME.lr=0.01")
        node[parts[-1]] = value
    return raw


def write_ensemble(dest: Path, raw: dict, header: str) -> Path:
    """An ensemble YAML written by a verb (`ablate --write`, `tune --write`): a comment saying how, then `raw`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return dest


def load_ensemble(project: Project, spec: str, overrides: list[str] = ()) -> tuple[Path, Ensemble, Competition]:
    path = resolve_ensemble_path(project, spec)
    shown = project.relative(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    defaults = raw.get("defaults") or {}
    members = raw.get("members")
    if not isinstance(defaults, dict):
        raise ConfigError(f"{shown}: defaults: expected a mapping of member fields")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise ConfigError(f"{shown}: members: expected a list of members, each a mapping with name and arch")
    merged = dict(raw, members=[deep_merge(defaults, m) for m in members])

    def blame_defaults(loc: tuple) -> tuple:
        # an error in a field the member inherited from defaults: point at defaults, where the user typed it
        if (len(loc) >= 3 and loc[0] == "members" and isinstance(loc[1], int)
                and loc[2] not in members[loc[1]] and loc[2] in defaults):
            return ("defaults", *loc[2:])
        return loc

    try:
        ensemble = Ensemble.model_validate(merged, context={"check_files": True})
    except ValidationError as e:
        raise one_line_error(shown, e, Ensemble, blame_defaults) from None
    competition = load_competition(project, ensemble.competition)
    return path, ensemble, competition
