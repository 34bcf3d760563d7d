"""The hand-written fastai script `overhead.py` compares `ens run` with: the same work as benchmarks' ONE_MEMBER
(test_resnet from scratch, digits at 32 px squished as ens's default `resize.method` does, 4 epochs one-cycle at
0.005, batch 64, the same augmentations, TTA n=4 beta .25 on the validation and test images, a CSV), written as a
notebook would."""

import sys
from pathlib import Path

from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, Normalize, RandomSplitter, Resize, ResizeMethod,
                               accuracy, aug_transforms, get_image_files, imagenet_stats, parent_label, set_seed,
                               vision_learner)

root = Path(sys.argv[1])
set_seed(42, reproducible=True)
block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                  splitter=RandomSplitter(0.2, seed=42), item_tfms=Resize(32, method=ResizeMethod.Squish),
                  batch_tfms=[*aug_transforms(size=32, do_flip=False, max_rotate=10, max_warp=0.1, max_lighting=0.2),
                              Normalize.from_stats(*imagenet_stats)])
dls = block.dataloaders(root / "train_images", bs=64, num_workers=0)
learn = vision_learner(dls, "test_resnet", pretrained=False, normalize=False, metrics=accuracy)
learn.fit_one_cycle(4, 0.005)
test_files = sorted((root / "test_images").iterdir())
valid_preds, _ = learn.tta(n=4, beta=0.25)
test_preds, _ = learn.tta(dl=dls.test_dl(test_files), n=4, beta=0.25)
labels = [dls.vocab[i] for i in test_preds.argmax(1)]
Path(sys.argv[2]).write_text("image_id,label\n" + "".join(f"{f.name},{l}\n" for f, l in zip(test_files, labels)))
