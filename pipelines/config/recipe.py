"""A member's options beyond arch, size and schedule: augmentation, resizing and prepared copies, TTA and its
views, the loss, mixup/cutmix, EMA and checkpoint averaging, pseudo-labels and distillation."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from .base import Size, Strict


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

