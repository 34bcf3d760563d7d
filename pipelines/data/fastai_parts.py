"""The fastai pieces of the loaders (`loaders.py`), at module level so that DataLoader workers started by spawn or
forkserver — as inside a Ray task, where a forked worker can hang — unpickle them by reference. Imported only
where training or prediction happens: it imports fastai.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorBase, TensorCategory, TensorImage, retain_type
from fastai.vision.all import PILImage, Resize, Transform
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

    def batch(self, indices):
        """A whole batch: the rows gathered from the memmap in one read (sorted, then put back in order)."""
        rows = self.rows[np.asarray(indices, dtype="int64")]
        order = np.argsort(rows, kind="stable")
        pixels = np.empty((len(rows), *self.images.shape[1:]), dtype="uint8")
        pixels[order] = self.images[rows[order]]
        x = TensorImage(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        if self.labels is None:
            return (x,)
        y = torch.from_numpy(self.labels[np.asarray(indices, dtype="int64")])
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
    ~0.2 ms per image; a gathered batch costs a memory copy)."""

    def create_batches(self, samps):
        yield from (self.dataset.batch(chunk) for chunk in chunked(samps, self.bs, self.drop_last))
