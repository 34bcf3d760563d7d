"""fastai DataLoaders for a member at a size, two ways that give the same pixels:

- from the images (JPEGs): fastai's DataBlock, with an item opener that decodes in JPEG draft mode where the
  target is at most half the image, and fastai's `Resize` skipped for images already at the target size;
- from a decoded copy (`decode: true`, `decoded.py`): whole batches gathered from a uint8 memmap — no per-item
  pipeline at all — then fastai's batch transforms (`aug_transforms`, `Normalize`) on the batch, on the GPU
  under CUDA.

Both are fastai `TfmdDL`s, so the Learner, callbacks, `get_preds` and TTA treat them alike. fastai is imported
inside the functions only.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache

from . import CompetitionData
from .decoded import decoded_images, open_image


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _loader_options(member, device) -> tuple[object, dict]:
    """(the device batches go to, DataLoader kwargs: workers and pinned memory, `accel.loader_options`)."""
    from fastai.torch_core import default_device

    from ..accel import loader_options

    device = default_device() if device is None else device  # as fastai's DataBlock.dataloaders
    return device, loader_options(member, getattr(device, "type", str(device)))[0]


def dataloaders(data: CompetitionData, member, size, device=None):
    """fastai DataLoaders for the training/validation split at `size` (normalisation is added by the caller, who
    knows the model's statistics): from the member's decoded copy with `decode: true`, else from the images.

    Call fastai's `set_seed` first: DataLoaders draw their own shuffling RNG from Python's `random` when built.
    """
    from fastai.vision.all import aug_transforms

    batch_tfms = []
    if member.aug_transforms is not None:  # presizing: items at resize.size, the batch augmentation brings them to size
        batch_tfms += aug_transforms(size=size, **member.aug_transforms.model_dump())
    # without a batch augmentation nothing would bring a presized item to the stage's size: the stage size governs
    presize = _hw(member.resize.size or size if batch_tfms else size)
    if member.decode:
        return _decoded_dataloaders(data, member, presize, batch_tfms, device)
    return _image_dataloaders(data, member, presize, batch_tfms, device)


def test_loader(dls, data: CompetitionData):
    """A DataLoader of `data`'s test images, prepared like `dls`'s validation images."""
    if isinstance(dls.valid.dataset, _dataset_classes()[0]):
        return dls.valid.new(dataset=dls.valid.dataset.test_split(), shuffle=False, drop_last=False)
    return dls.test_dl([str(data.root / p) for p in data.test_paths])


# --------------------------------------------------------------------------------------------- from the images
@lru_cache(maxsize=None)
def _image_transforms():
    from fastai.vision.all import PILImage, Resize, Transform
    from fastai.torch_core import retain_type
    from PIL import Image

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

    return OpenImage, Presize


def _image_dataloaders(data, member, presize, batch_tfms, device):
    from fastai.vision.all import CategoryBlock, DataBlock, IndexSplitter, IntToFloatTensor, ItemGetter, TransformBlock

    OpenImage, Presize = _image_transforms()
    # (path, label) pairs, not a DataFrame: reading pandas rows per item cost ~5% of a small member's run
    items = [(str(data.root / p), label) for p, label in zip(data.train_paths, data.train_labels)]
    valid_idx = [i for i, v in enumerate(data.is_valid) if v]
    method = member.resize.method
    images = TransformBlock(type_tfms=OpenImage(presize, method), batch_tfms=IntToFloatTensor)
    block = DataBlock(blocks=(images, CategoryBlock(vocab=data.vocab)), get_x=ItemGetter(0), get_y=ItemGetter(1),
                      splitter=IndexSplitter(valid_idx), item_tfms=[Presize(presize, method=method)],
                      batch_tfms=batch_tfms)
    device, options = _loader_options(member, device)
    return block.dataloaders(items, bs=member.batch_size, device=device, **options)


# --------------------------------------------------------------------------------------------- from a decoded copy
@lru_cache(maxsize=None)
def _dataset_classes():
    import numpy as np
    import torch
    from fastai.data.core import TfmdDL
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import TensorCategory, TensorImage
    from fastcore.basics import chunked

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
            return x, TensorCategory(torch.from_numpy(self.labels[np.asarray(indices, dtype="int64")]))

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

    return DecodedSplit, DecodedDL


def _decoded_dataloaders(data, member, presize, batch_tfms, device):
    import numpy as np
    from fastai.data.core import DataLoaders
    from fastai.vision.all import IntToFloatTensor

    DecodedSplit, DecodedDL = _dataset_classes()
    decoded = decoded_images(data, presize)
    vocab = data.vocab
    index = {label: i for i, label in enumerate(vocab)}
    labels = np.array([index[label] for label in data.train_labels], dtype="int64")
    rows = np.array(decoded.rows(data.train_paths))
    train_idx = [i for i, v in enumerate(data.is_valid) if not v]
    valid_idx = [i for i, v in enumerate(data.is_valid) if v]
    test_rows = decoded.rows(data.test_paths)
    tfms = [IntToFloatTensor(), *batch_tfms]
    device, options = _loader_options(member, device)
    common = dict(device=device, after_batch=tfms, **options)
    # as fastai's: the shuffled training batches drop the last incomplete one
    train = DecodedDL(DecodedSplit(decoded, rows[train_idx], labels[train_idx], vocab, 0, test_rows),
                      bs=member.batch_size, shuffle=True, drop_last=True, **common)
    # made from the training loader, as fastai's DataBlock makes it: the same random draws, in the same order, so
    # that a member trains and predicts exactly as from the images
    valid = train.new(DecodedSplit(decoded, rows[valid_idx], labels[valid_idx], vocab, 1, test_rows),
                      shuffle=False, drop_last=False)
    return DataLoaders(train, valid, device=device)
