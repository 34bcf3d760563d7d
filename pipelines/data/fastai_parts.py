"""The fastai pieces of the loaders (`loaders.py`), at module level so that DataLoader workers started by spawn or
forkserver — as inside a Ray task, where a forked worker can hang — unpickle them by reference. Imported only
where training or prediction happens: it imports fastai.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorBase, TensorCategory, TensorImage, retain_type, to_device
from fastai.vision.all import PILImage, Resize, Transform
from fastai.vision.augment import AffineCoordTfm, _draw_mask, _init_mat, _WarpCoord, affine_grid, compose_tfms
from fastcore.basics import chunked
from PIL import Image

from .decoded import open_image


class OpenImage(Transform):
    """fastai's `PILImage.create` for paths, decoding JPEGs in draft mode when the target allows it (PIL's
    `draft` must come before the pixels are loaded, which `PILImage.create` does at once)."""

    def __init__(self, target_hw, method):
        super().__init__()
        self.target_hw, self.method = target_hw, method

    def encodes(self, path: str | os.PathLike):
        return PILImage(open_image(path, self.target_hw, self.method))


class Presize(Resize):
    """fastai's `Resize`, cheaper where it can be: an image already at the target size is left alone (its
    crop and pad are then by zero pixels and its resize a copy: three full-size copies through torchvision's
    `pad` for nothing), and a squish is PIL's resize alone, without the random crop position fastai draws
    and ignores for it (so a member draws the same random numbers from the images as from a decoded copy)."""

    def __call__(self, b, split_idx=None, **kwargs):
        image = b[0] if isinstance(b, tuple) else b
        if isinstance(image, Image.Image) and (image.size == tuple(self.size) or self.method == "squish"):
            if image.size != tuple(self.size):
                image = retain_type(image.resize(tuple(self.size), self.mode), image)
            return (image, *b[1:]) if isinstance(b, tuple) else image
        return super().__call__(b, split_idx=split_idx, **kwargs)


class DecodedSplit:
    """Rows of a decoded copy (and their class indices, or None for test images) as fastai sees a dataset:
    items (image CHW uint8, label), a vocab, `split_idx` (0 trains: the batch augmentation runs; 1 does
    not) and fastai's `set_split_idx` (TTA switches it)."""

    def __init__(self, decoded, rows, labels, vocab, split_idx, test_rows=()):
        self.decoded, self.rows, self.labels, self.vocab = decoded, np.asarray(rows, dtype="int64"), labels, vocab
        self.split_idx, self.test_rows, self._images = split_idx, list(test_rows), None
        self.c, self.loss_func = len(vocab), CrossEntropyLossFlat()

    @property
    def images(self):  # opened lazily, in each DataLoader worker anew
        if self._images is None:
            self._images = self.decoded.images
        return self._images

    def __getstate__(self):
        return {**self.__dict__, "_images": None}

    def __len__(self):
        return len(self.rows)

    def batch(self, indices, pin: bool = False):
        """A whole batch: the rows gathered from the memmap in one read (sorted, then put back in order), as
        uint8 (the device converts: a quarter of float32's bytes to copy). With `pin`, gathered straight into
        page-locked memory, from which the copy to CUDA runs asynchronously (`non_blocking`)."""
        rows = self.rows[np.asarray(indices, dtype="int64")]
        order = np.argsort(rows, kind="stable")
        shape = (len(rows), *self.images.shape[1:])
        pixels = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        pixels.numpy()[order] = self.images[rows[order]]
        x = TensorImage(pixels.permute(0, 3, 1, 2))
        if self.labels is None:
            return (x,)
        y = torch.from_numpy(self.labels[np.asarray(indices, dtype="int64")])
        y = y.pin_memory() if pin else y
        return x, (TensorCategory(y) if y.ndim == 1 else TensorBase(y))  # 2-D: soft targets and weights (distill)

    def __getitem__(self, i):
        return tuple(t[0] for t in self.batch([i]))

    @contextmanager
    def set_split_idx(self, i):
        old, self.split_idx = self.split_idx, i
        try:
            yield self
        finally:
            self.split_idx = old

    def test_split(self):
        return DecodedSplit(self.decoded, self.test_rows, None, self.vocab, 1)


class DecodedDL(TfmdDL):
    """fastai's TfmdDL yielding whole batches from a `DecodedSplit` (fastai's per-item path would cost
    ~0.2 ms per image; a gathered batch costs a memory copy).

    In the main process (no workers, the default for a decoded copy) the batches are gathered `prefetch` ahead
    by a background thread (`prefetch.Prefetch`), into pinned memory on CUDA, and copied to the device with
    `non_blocking=True`: the gathering overlaps the device's step, and the copy waits for nothing. `prefetch`
    None (the default) means 2 on CUDA and 0 (fastai's own loop) elsewhere. The batches, their order and every
    random draw are the same either way: the shuffle is drawn before the thread starts, the batch transforms
    (augmentation, uint8 → float, normalisation) run on the consumer's side, on the device."""

    prefetch: int | None = None

    def create_batches(self, samps):
        pin = self._pinned()
        yield from (self.dataset.batch(chunk, pin=pin) for chunk in chunked(samps, self.bs, self.drop_last))

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _pinned(self) -> bool:
        return bool(self.pin_memory) and self._cuda() and self.fake_l.num_workers == 0

    def _depth(self) -> int:
        if self.fake_l.num_workers > 0:  # torch's workers prefetch already
            return 0
        return (2 if self._cuda() else 0) if self.prefetch is None else int(self.prefetch)

    def __iter__(self):
        depth = self._depth()
        if not depth:
            yield from super().__iter__()
            return
        from .prefetch import Prefetch

        self.randomize()  # as fastai's DataLoader.__iter__, in the main thread: the same draws in the same order
        self.before_iter()
        self._DataLoader__idxs = self.get_idxs()
        # torch's DataLoader iterator, which fastai's loop starts here, draws its base seed from torch's generator:
        # drawn alike, so that the augmentation's draws after it are the same with the prefetch and without
        torch.empty((), dtype=torch.int64).random_()
        pinned = self._pinned()
        with Prefetch(self.create_batches(self.sample()), depth) as batches:
            for b in batches:
                if self.device is not None:
                    b = to_device(b, self.device, non_blocking=pinned)
                yield self.after_batch(b)
        self.after_iter()
        if hasattr(self, "it"):
            del self.it


# --------------------------------------------------------------------------------------------- augmentation
# fastai's affine augmentation, less its four host-device syncs per batch (on CUDA, where the batch augmentation
# runs: issue 23): `_grid_sample` reads the zoom (`.item()`) for a down-sampling hack that can apply only where the
# input is over twice the output's size; the warp copies its corner points from the host (`torch.tensor(...,
# device=)`), solves its 8 coefficients with `torch.linalg.solve` (which reads back its error flag) and asks
# `if (...).any()` whether a point went to infinity. The same numbers, computed without asking the host.
def _grid_sample(x, coords, mode="bilinear", padding_mode="reflection", align_corners=None):
    """fastai's `_grid_sample`, reading the zoom back only where its hack can apply (input > 2x the output)."""
    import torch.nn.functional as F

    if mode == "bilinear":
        d = min(x.shape[-2] / coords.shape[-2], x.shape[-1] / coords.shape[-1]) / 2
        if d > 1 and d > 1 / (coords.max() - coords.min()).item() * 2:
            x = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    return F.grid_sample(x, coords, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def _find_coeffs(p1, p2):
    """fastai's `find_coeffs` solved by `torch.linalg.solve_ex` (no error check read back: the warp's points never
    make the system singular: fastai's magnitude is below 1)."""
    p = p1[:, 0, 0]
    zero, one = torch.zeros_like(p), torch.ones_like(p)
    m = []
    for i in range(p1.shape[1]):
        m.append(torch.stack([p2[:, i, 0], p2[:, i, 1], one, zero, zero, zero, -p1[:, i, 0] * p2[:, i, 0],
                              -p1[:, i, 0] * p2[:, i, 1]]))
        m.append(torch.stack([zero, zero, zero, p2[:, i, 0], p2[:, i, 1], one, -p1[:, i, 1] * p2[:, i, 0],
                              -p1[:, i, 1] * p2[:, i, 1]]))
    return torch.linalg.solve_ex(torch.stack(m).permute(2, 0, 1), p1.view(p1.shape[0], 8, 1)).result


def _apply_perspective(coords, coeffs):
    """fastai's `apply_perspective` with its `if any point is at infinity: leave the coordinates` as a select."""
    sz = coords.shape
    coords = coords.view(sz[0], -1, 2)
    coeffs = torch.cat([coeffs, torch.ones_like(coeffs[:, :1])], dim=1).view(coeffs.shape[0], 3, 3)
    coords1 = coords @ coeffs[..., :2].transpose(1, 2) + coeffs[..., 2].unsqueeze(1)
    warped = (coords1 / coords1[..., 2].unsqueeze(-1))[..., :2]
    return torch.where((coords1[..., 2] == 0.0).any(), coords, warped).view(*sz)


_CORNERS: dict = {}


def _corners(dtype, device):
    """The warp's four corner points, made once per dtype and device: fastai's `torch.tensor(..., device=)`
    copies them from the host every batch, and a copy from pageable memory waits for the device."""
    key = (dtype, str(device))
    if key not in _CORNERS:
        _CORNERS[key] = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=dtype, device=device)
    return _CORNERS[key]


class _SyncFreeWarp(_WarpCoord):
    def before_call(self, x):
        """fastai's `_WarpCoord.before_call` (the same draws, in the same order), the corners from `_corners`."""
        x_t = _draw_mask(x, self._def_draw, self.draw_x, p=self.p, batch=self.batch)
        y_t = _draw_mask(x, self._def_draw, self.draw_y, p=self.p, batch=self.batch)
        self.orig_pts = _corners(x.dtype, x.device).unsqueeze(0).expand(x.size(0), 4, 2)
        targ_pts = torch.stack([torch.stack([-1 - y_t, -1 - x_t]), torch.stack([-1 + y_t, 1 + x_t]),
                                torch.stack([1 + y_t, -1 + x_t]), torch.stack([1 - y_t, 1 - x_t])])
        self.targ_pts = targ_pts.permute(2, 0, 1)

    def __call__(self, x, invert=False):
        pts = (self.targ_pts, self.orig_pts) if invert else (self.orig_pts, self.targ_pts)
        return _apply_perspective(x, _find_coeffs(*pts))


class SyncFreeAffine(AffineCoordTfm):
    """fastai's AffineCoordTfm (flip, rotate, zoom, warp in one resampling) without reads back to the host."""

    def _encode(self, x, mode, reverse=False):
        if type(x) is not TensorImage:  # masks, points: fastai's own (ens classifies images)
            return super()._encode(x, mode, reverse)
        coord_func = None if len(self.coord_fs) == 0 or self.split_idx else partial(compose_tfms, tfms=self.coord_fs,
                                                                                    reverse=reverse)
        mat, sz = self.mat, self.size
        if mat is None and coord_func is None and sz is None:
            return x
        size = tuple(x.shape[-2:]) if sz is None else (sz, sz) if isinstance(sz, int) else tuple(sz)
        coords = affine_grid(_init_mat(x)[:, :2] if mat is None else mat, x.shape[:2] + size,
                             align_corners=self.align_corners)
        if coord_func is not None:
            coords = coord_func(coords)
        return TensorImage(_grid_sample(x, coords, mode=mode, padding_mode=self.pad_mode,
                                        align_corners=self.align_corners))


def sync_free(tfms: list) -> list:
    """`tfms` (fastai's `aug_transforms`) with their affine transform and its warps made `SyncFreeAffine` and
    `_SyncFreeWarp`, in place: the same state, the same numbers."""
    from fastai.vision.augment import Dihedral, Flip, Rotate, Warp, Zoom

    # aug_transforms composes every affine transform into the first one, of any of these classes: they differ
    # from AffineCoordTfm in their __init__ alone
    for tfm in tfms:
        if type(tfm) in (AffineCoordTfm, Dihedral, Flip, Rotate, Warp, Zoom):
            tfm.__class__ = SyncFreeAffine
            for f in tfm.coord_fs:
                if type(f) is _WarpCoord:
                    f.__class__ = _SyncFreeWarp
    return tfms
