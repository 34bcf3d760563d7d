"""The winners' training recipe as member options, from the libraries' own parts: label smoothing (fastai's
`LabelSmoothingCrossEntropyFlat`), mixup and cutmix (fastai's `MixUp`, `CutMix`; both: each batch one or the
other), and an exponential moving average of the weights (timm's `ModelEmaV3`) that validation, TTA and the kept
weights use. Imported where training happens (it imports fastai and timm).
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import LabelSmoothingCrossEntropyFlat


class LastEpochsAverage(Callback):
    """The running sum of the model's weights at the end of each of the last `epochs` epochs of the member's last
    fit (`active` is set on that fit only); `apply()` puts their mean into the model."""

    order = 66

    def __init__(self, epochs: int):
        self.epochs, self.active, self.total, self.count = epochs, False, None, 0

    def after_epoch(self):
        if not self.active or self.epoch < self.n_epoch - self.epochs:
            return
        state = {k: v.detach().double().cpu() for k, v in self.learn.model.state_dict().items()
                 if v.is_floating_point()}
        self.total = state if self.total is None else {k: self.total[k] + v for k, v in state.items()}
        self.count += 1

    def state(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load(self, state: dict) -> None:
        self.total, self.count = state["total"], state["count"]

    def apply(self, model) -> None:
        current = model.state_dict()
        model.load_state_dict({k: (self.total[k] / self.count).to(v.dtype) if k in self.total else v
                               for k, v in current.items()})


class SoftTargetLoss:
    """Distillation's loss: on a batch of soft targets (N × C+1: each row's target distribution, its weight last)
    the weighted mean of the cross-entropy to the targets — the KL divergence to the teacher up to its constant
    entropy, one-hot rows being the labels' plain cross-entropy; on class labels (validation), `base`. With label
    smoothing `eps` each target row becomes (1 - eps) · row + eps / C, as fastai's label smoothing does to a
    one-hot row: labelled rows then train exactly as `LabelSmoothingCrossEntropyFlat(eps)` would."""

    def __init__(self, base, eps: float = 0.0):
        self.base, self.eps = base, eps

    def __call__(self, pred, y, **kwargs):
        if y.ndim == 2 and y.is_floating_point():
            targets, weights = y[:, :-1], y[:, -1]
            targets = (1 - self.eps) * targets + self.eps / targets.shape[1]
            ce = -(targets * torch.log_softmax(pred.float(), 1)).sum(1)
            return (weights * ce).sum() / weights.sum()
        return self.base(pred, y, **kwargs)

    def activation(self, x):
        return self.base.activation(x)

    def decodes(self, x):
        return self.base.decodes(x)


def loss_func(member):
    """The member's loss, or None for the learner's default (cross-entropy)."""
    if member.loss is not None and member.loss.label_smoothing:
        return LabelSmoothingCrossEntropyFlat(eps=member.loss.label_smoothing)
    return None


def distill_loss(member, base):
    """A distilled member's loss: soft targets, smoothed by its `loss.label_smoothing`; `base` on labels."""
    return SoftTargetLoss(base, member.loss.label_smoothing if member.loss is not None else 0.0)


class MixUpOrCutMix(CutMix):
    """Each training batch mixed by MixUp or by CutMix, chosen by a fair draw from torch's generator (so seeded and
    checkpointed like every other draw); each with its own Beta(alpha, alpha)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float):
        super().__init__(cutmix_alpha)
        self.distribs = {MixUp: MixUp(mixup_alpha).distrib, CutMix: self.distrib}

    def before_batch(self):
        kind = MixUp if torch.rand(1).item() < 0.5 else CutMix
        self.distrib = self.distribs[kind]
        kind.before_batch(self)  # draws into this handler's own lam and yb1, which `lf` reads


def mix_callbacks(member) -> list:
    """fastai's MixUp / CutMix callback of the member, or both alternating; [] without."""
    if member.mixup and member.cutmix:
        return [MixUpOrCutMix(member.mixup.alpha, member.cutmix.alpha)]
    if member.mixup:
        return [MixUp(member.mixup.alpha)]
    if member.cutmix:
        return [CutMix(member.cutmix.alpha)]
    return []


class EMAWeights(Callback):
    """timm's ModelEmaV3 of the learner's model, updated after every optimiser step (its decay warmed up by the
    step count when `warmup`), swapped in for validation so that the recorded metrics are the average's, and
    loaded into the model by `apply()` once training ends (then TTA and the kept weights are the average's).
    One instance serves every fit of a member (frozen and unfrozen phases): its step count goes on."""

    order = 65  # after the Recorder (50) and the epoch log (60) have read the training batch

    def __init__(self, model, decay: float, warmup: bool):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
        self.steps, self._live = 0, None

    def before_fit(self):  # fastai has moved the model to the batches' device by now
        self.ema.module.to(next(self.learn.model.parameters()).device)

    def after_step(self):
        self.steps += 1
        self.ema.update(self.learn.model, step=self.steps)

    def before_validate(self):
        self._live, self.learn.model = self.learn.model, self.ema.module.eval()

    def after_validate(self):
        if self._live is not None:
            self.learn.model, self._live = self._live, None

    after_cancel_validate = after_validate

    def state(self) -> dict:
        """What a checkpoint keeps of it."""
        return {"module": self.ema.module.state_dict(), "steps": self.steps}

    def load(self, state: dict) -> None:
        self.ema.module.load_state_dict(state["module"])
        self.steps = state["steps"]

    def apply(self, model) -> None:
        """The average's weights into `model` (the trained member)."""
        model.load_state_dict(self.ema.module.state_dict())
