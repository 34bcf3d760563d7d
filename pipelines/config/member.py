"""One ensemble member: the pydantic model, its checks, its stage plan and the fields that make its cache keys."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .base import PIXELS, TTA_SEEDING, Size, Strict, _square, is_classical, parse_bytes
from .recipe import EMA, TTA, AugTransforms, Average, Distill, ItemResize, Loss, Mix, Prepare, Pseudo
from .tuning import Tune, TuneRange


TUNE_FIXED = ("name", "tune", "epochs", "stages", "weight", "num_workers", "keep_model", "gpu_memory", "deterministic",
              "decode", "compile", "min_micro_batch")


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
    # the smallest micro-batch the budget may force (None: 16 where the network has BatchNorm, whose statistics of
    # fewer images are noise, else 2); below it the member is a budget error rather than a worse model
    min_micro_batch: Optional[int] = Field(None, ge=2)
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

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v):
        # the name goes into file names (`ens tune`'s study, notebooks): nothing that could leave the folder
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("a member name is letters, digits, '_', '.' and '-', starting with a letter or digit; "
                             "rename it")
        return v

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
        if self.classical:  # its classifier fits hard labels: the test images would count as labelled ones
            raise ValueError(f"distill trains a network on soft targets; {self.arch} fits hard labels only: "
                             "drop distill or give the member a network arch")
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

    def ignored(self) -> list[tuple[str, str]]:
        """(field, why) for each field set on this member that changes nothing, because another governs: a smoke
        test's `epochs=1` on a member with `stages` would otherwise train the full run (`config.loading` makes
        these errors or warnings, naming the field that governs and how to change it)."""
        out, given = [], self.model_fields_set
        if self.stages:
            shown = "[" + ", ".join(f"[{_size_text(s)}, {e}]" for s, e in self.stages) + "]"
            fix = f"change stages instead, e.g. members.{self.name}.stages=[[{_size_text(self.stages[0][0])},1]]"
            for name, what in (("epochs", "epochs"), ("size", "sizes")):
                if name in given:
                    out.append((name, f"ignored: stages {shown} govern {self.name}'s {what}; {fix}"))
        if self.aug_transforms is None and self.resize.size is not None:
            out.append(("resize.size", "ignored: without aug_transforms each image is resized straight to the stage "
                                       "size; set aug_transforms, or drop resize.size"))
        if self.pretrained is False and "freeze_epochs" in given and self.freeze_epochs:
            out.append(("freeze_epochs", "ignored: a body trained from scratch (pretrained: false) is never frozen; "
                                         "drop freeze_epochs, or set pretrained: true"))
        if "beta" in self.tta.model_fields_set and not self.tta_passes:
            out.append(("tta.beta", "ignored: no augmented TTA passes to blend with the plain one (tta.n 0, or no "
                                    "aug_transforms and resize.method not crop); set tta.n, or drop tta.beta"))
        return out

    # fields that do not change a member's predictions
    RUN_ONLY: ClassVar[tuple] = ("name", "weight", "num_workers", "keep_model", "gpu_memory", "tune",
                                 "deterministic", "decode", "compile", "min_micro_batch")

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


def _size_text(size) -> str:
    return f"[{size[0]},{size[1]}]" if isinstance(size, (tuple, list)) else str(size)


# the random TTA passes of each split start from a seed of their own (the member's seed + 1 for validation, + 2 for
