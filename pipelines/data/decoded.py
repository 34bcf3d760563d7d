"""Decoded copies: every training and test image decoded once, at one pre-size, into a uint8 numpy array on disk
(N × H × W × 3, an .npy file read as a memmap), so that training, validation, TTA and test prediction gather
batches from memory instead of decoding JPEGs every epoch.

The pixels are exactly the JPEG path's (`load_item` is what both call: PIL's draft decode, RGB, a bilinear
squish), so a member reads the same images either way and `decode` stays out of the cache key.

A copy lives in cache/decoded/<competition>/<h>x<w>-<key>/, the key a hash of the images (their fingerprint, the
folder read: the originals or a prepared copy, and the file lists) and the decoder: new data, another size or a
prepared copy make another copy; every member and fold at that size share one. It is built in parallel into a
`.building-<pid>` folder and renamed into place when complete, under a lock (one builder; others wait and use
it); a build killed midway leaves only that folder, swept by the next build.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import PIXELS
from ..util import owner_tag, process_pool

IMAGES = "images.npy"
INDEX = "index.json"


def draft_request(image_size: tuple[int, int], target_hw: tuple[int, int], method: str) -> tuple[int, int]:
    """The (width, height) to ask PIL's JPEG `draft` for: the smallest decode that still covers what the resize
    `method` takes from the image at `target_hw`. PIL decodes at 1/2, 1/4 or 1/8 only where the result stays at
    least that large (DCT scaling), so a target more than half the image decodes in full."""
    w, h = image_size
    th, tw = target_hw
    if method == "squish":
        return tw, th
    # crop keeps the window the target's shape inside the image (scale min), pad fits the image inside it (max)
    m = (min if method == "crop" else max)(w / tw, h / th)
    return max(1, math.ceil(w / m)), max(1, math.ceil(h / m))


def open_image(path, target_hw: tuple[int, int], method: str = "squish"):
    """The image at `path` as RGB, decoded in JPEG draft mode where the target is at most half its size (≈2×
    cheaper than a full decode; other formats decode in full)."""
    from PIL import Image

    image = Image.open(path)
    image.draft("RGB", draft_request(image.size, target_hw, method))
    return image.convert("RGB")


def load_item(path, target_hw: tuple[int, int]):
    """The pixels a member trains on at pre-size `target_hw` (h, w) with `resize.method: squish`: the draft
    decode, then PIL's bilinear resize when the size differs — what fastai's `Resize(method='squish')` does
    (its crop and pad are by zero pixels there)."""
    from PIL import Image

    image = open_image(path, target_hw)
    th, tw = target_hw
    return image if image.size == (tw, th) else image.resize((tw, th), Image.BILINEAR)


@dataclass(frozen=True)
class Decoded:
    """A built copy: `images` (N × H × W × 3 uint8, read-only memmap) in the order `paths`."""

    folder: Path
    paths: list[str]

    @property
    def images(self):
        import numpy as np

        return np.load(self.folder / IMAGES, mmap_mode="r")

    def rows(self, paths: list[str]) -> list[int]:
        where = {p: i for i, p in enumerate(self.paths)}
        return [where[p] for p in paths]


def decoded_folder(data, hw: tuple[int, int]) -> Path:
    """Where the copy of `data`'s training and test images at `hw` lives (built or not)."""
    if data.cache_root is None:
        raise ValueError("decoded copies need the project's cache folder (data.cache_root)")
    source = [data.images_fingerprint or data.fingerprint, data.root.name, data.train_paths, data.test_paths]
    key = hashlib.sha256(json.dumps([source, list(hw), PIXELS]).encode()).hexdigest()[:16]
    return data.cache_root / "decoded" / data.competition.name / f"{hw[0]}x{hw[1]}-{key}"


def decoded_images(data, hw: tuple[int, int], say=None) -> Decoded:
    """The copy of `data`'s training then test images at `hw` (h, w), built first if missing (see module doc)."""
    from ..util import building

    dest = decoded_folder(data, hw)
    paths = list(data.train_paths) + list(data.test_paths)
    if not (dest / INDEX).is_file():
        with building(dest, ["*.building-{owner}"]):
            if not (dest / INDEX).is_file():
                _build(data, paths, hw, dest, say or (lambda text: print(text, file=sys.stderr, flush=True)))
    return Decoded(dest, paths)


def _fill(args) -> int:
    """Decode `paths` into rows start.. of the copy being built at `file` (a worker's share)."""
    import numpy as np

    file, root, paths, start, hw = args
    images = np.load(file, mmap_mode="r+")
    for i, p in enumerate(paths):
        images[start + i] = np.asarray(load_item(Path(root) / p, hw))
    images.flush()
    return len(paths)


def _allocate(file: Path) -> None:
    """Reserve the disk blocks of `file` (a sparse memmap): a full disk is then an OSError here, not a SIGBUS in
    whichever process first writes a page with no block left to hold it."""
    import errno

    with open(file, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            # a filesystem that cannot reserve space: at least refuse a copy larger than the free space
            import shutil

            if shutil.disk_usage(file.parent).free < os.fstat(f.fileno()).st_size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file)) from None


def _build(data, paths: list[str], hw: tuple[int, int], dest: Path, say) -> None:
    import shutil

    import numpy as np

    from ..errors import disk_full, disk_full_error

    start = time.perf_counter()
    tmp = dest.with_name(dest.name + f".building-{owner_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shape = (len(paths), hw[0], hw[1], 3)
    size = math.prod(shape)
    say(f"decoding {len(paths)} images once at {hw[0]}x{hw[1]} ({size / 2**30:.2f} GiB) into {dest.parent} ...")
    try:
        np.lib.format.open_memmap(tmp / IMAGES, mode="w+", dtype="uint8", shape=shape).flush()
        _allocate(tmp / IMAGES)
        workers = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                             len(paths) // 64))
        step = math.ceil(len(paths) / (workers * 8))
        jobs = [(tmp / IMAGES, data.root, paths[i:i + step], i, hw) for i in range(0, len(paths), step)]
        if workers == 1:
            for job in jobs:
                _fill(job)
        else:
            import PIL.Image  # noqa: F401 - imported before the fork: the workers only decode

            with process_pool(workers) as pool:
                list(pool.map(_fill, jobs))
        (tmp / INDEX).write_text(json.dumps({"paths": paths, "shape": shape, "decoder": PIXELS,
                                             "root": str(data.root), "fingerprint": data.images_fingerprint}))
        tmp.rename(dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise disk_full_error(dest.parent, f"a decoded copy ({size / 2**30:.2f} GiB)") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"decoded {len(paths)} images in {time.perf_counter() - start:.1f} s")


def decoded_bytes(n_images: int, hw: tuple[int, int]) -> int:
    """The disk a copy of `n_images` at `hw` takes (uint8 RGB; the .npy header aside)."""
    return n_images * hw[0] * hw[1] * 3
