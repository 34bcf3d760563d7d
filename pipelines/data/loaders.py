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


from typing import TYPE_CHECKING

from .decoded import decoded_images

if TYPE_CHECKING:
    from . import CompetitionData


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
        from .fastai_parts import sync_free  # no read back to the host per batch (a sync on CUDA)

        batch_tfms += sync_free(aug_transforms(size=size, **member.aug_transforms.model_dump()))
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
def _image_transforms():
    """(OpenImage, Presize): module-level classes, so that DataLoader workers started by spawn or forkserver
    (inside a Ray task) can unpickle them."""
    from .fastai_parts import OpenImage, Presize

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
def _dataset_classes():
    from .fastai_parts import DecodedDL, DecodedSplit

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
    if data.soft_targets is not None:  # distillation: each training row's target distribution, its weight last
        targets, weights = data.soft_targets
        soft = np.concatenate([targets, weights[:, None]], axis=1).astype("float32")
    train = DecodedDL(DecodedSplit(decoded, rows[train_idx], (labels if data.soft_targets is None else soft)[train_idx],
                                   vocab, 0, test_rows),
                      bs=member.batch_size, shuffle=True, drop_last=True, **common)
    # made from the training loader, as fastai's DataBlock makes it: the same random draws, in the same order, so
    # that a member trains and predicts exactly as from the images
    valid = train.new(DecodedSplit(decoded, rows[valid_idx], labels[valid_idx], vocab, 1, test_rows),
                      shuffle=False, drop_last=False)
    return DataLoaders(train, valid, device=device)
