"""No host–device sync per training step (issue 23): fastai's Recorder reads every batch's loss back to the host
(`AvgSmoothLoss` and `AvgLoss` through `to_detach`, which copies to the CPU; `AvgMetric` likewise), and each such
read waits for the GPU to finish the step, so the host cannot queue the next one meanwhile. Here the same
running values are kept on the loss's device and read once per epoch (the Recorder's `after_train` /
`after_validate`), as fastai computes them: the recorded losses, metrics and log are the same numbers (bit for
bit on the CPU), only read later.

`OnDeviceRecords` is a fastai callback: it swaps the Recorder's and the learner's averaging metrics for the
on-device ones at each fit's start and brings the per-batch smoothed losses (`recorder.losses`) to the CPU at each
epoch's end. Imported where training happens only: it imports fastai.
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss
from fastai.torch_core import find_bs


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's AvgSmoothLoss without the copy to the CPU: the running value stays on the loss's device."""

    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.detach().mean()
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class DeviceAvgLoss(AvgLoss):
    """fastai's AvgLoss (the validation loss) summed on the loss's device."""

    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += learn.loss.detach().mean() * bs
        self.count += bs


class DeviceAvgMetric(AvgMetric):
    """fastai's AvgMetric (accuracy, error rate ...) summed on the device of the metric's value."""

    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += _detached(self.func(learn.pred, *learn.yb)) * bs
        self.count += bs


class OnDeviceRecords(Callback):
    """The Recorder's running values kept on the device; read once per epoch."""

    order = -40  # before the Recorder (50), which resets the smoothed loss in its before_fit

    def before_fit(self):
        recorder = self.learn.recorder
        if type(recorder.smooth_loss) is AvgSmoothLoss:
            recorder.smooth_loss = DeviceSmoothLoss(beta=recorder.smooth_loss.beta)
        if type(recorder.loss) is AvgLoss:
            recorder.loss = DeviceAvgLoss()
        metrics = list(self.learn.metrics)
        if any(type(m) is AvgMetric for m in metrics):
            self.learn.metrics = [DeviceAvgMetric(m.func) if type(m) is AvgMetric else m for m in metrics]

    def before_train(self):
        self.first = len(self.learn.recorder.losses)

    def after_train(self):
        """The epoch's smoothed losses to the CPU in one copy, as fastai keeps them (0-d CPU tensors)."""
        recorder = self.learn.recorder
        new = recorder.losses[self.first:]
        if new and any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in new):
            recorder.losses[self.first:] = list(torch.stack([torch.as_tensor(v) for v in new]).cpu().unbind())
            self.learn.smooth_loss = recorder.losses[-1]
