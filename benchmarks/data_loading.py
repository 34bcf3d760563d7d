"""6. Loading paddy-shaped 480x640 JPEGs for a 224 px member: images per second of one pass over the training set
(loader only: no batch augmentation, which runs on the GPU in real use), each arm against fastai's default item
path (`ImageBlock` + `Resize(224)`, as a hand-written fastai script loads them):

- ens from the JPEGs (draft decode at 1/2, no crop/pad for nothing);
- ens from a prepared (shrunk) copy, max_size 256 (Road to the Top's trick);
- ens from the decoded copy (`decode: true`): batches gathered from a uint8 memmap. Goal >= 20x.

All with the workers ens defaults to (the cores available; none for a decoded copy), alternating, several repeats, medians.
Run: .venv/bin/python benchmarks/data_loading.py
"""

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from paddy_like import make_paddy_like  # noqa: E402

from pipelines.accel import available_cores  # noqa: E402
from pipelines.config import Member, Prepare, Project, load_competition  # noqa: E402
from pipelines.data import dataloaders, load_data, prepare_data  # noqa: E402
from pipelines.data.decoded import decoded_images  # noqa: E402


def rate(dls) -> float:
    """Training images per second once the loader runs (the first batch, which starts the workers, excluded): the
    uint8 batches as they go to the device (the conversion to float runs there, on the GPU in real use)."""
    batches = iter(dls.train.new(after_batch=None))
    next(batches)
    start, n = time.perf_counter(), 0
    for xb, _ in batches:
        n += len(xb)
    return n / (time.perf_counter() - start)


def fastai_default(data, workers: int):
    from fastai.vision.all import CategoryBlock, DataBlock, ImageBlock, IndexSplitter, ItemGetter, Resize

    items = [(str(data.root / p), label) for p, label in zip(data.train_paths, data.train_labels)]
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=ItemGetter(0), get_y=ItemGetter(1),
                      splitter=IndexSplitter([i for i, v in enumerate(data.is_valid) if v]), item_tfms=Resize(224))
    return block.dataloaders(items, bs=32, num_workers=workers)


def main(per_class: int = 50, repeats: int = 3) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = make_paddy_like(tmp / "paddy", per_class=per_class, n_test=8)
        (tmp / "project/competitions").mkdir(parents=True)
        text = (HERE.parent / "competitions/paddy.yaml").read_text()
        (tmp / "project/competitions/paddy.yaml").write_text(text + f"\ndata_dir: {data_root}\n")
        project = Project(tmp / "project")
        data = load_data(project, load_competition(project, "paddy"))
        workers = available_cores()
        member = Member(name="m", arch="resnet18", size=224, batch_size=32, aug_transforms=None)
        start = time.perf_counter()
        prepared = prepare_data(data, Prepare(max_size=256), project.cache)
        prepared_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded_images(data, (224, 224), say=lambda text: None)
        decoded_s = time.perf_counter() - start
        arms = {"fastai": lambda: fastai_default(data, workers),
                "jpeg": lambda: dataloaders(data, member, 224),
                "prepared": lambda: dataloaders(prepared, member, 224),
                "decoded": lambda: dataloaders(data, member.model_copy(update={"decode": True}), 224)}
        rates = {k: [] for k in arms}
        for _ in range(repeats):
            for name, make in arms.items():
                rates[name].append(rate(make()))
        shutil.rmtree(tmp / "project", ignore_errors=True)
    r = {k: statistics.median(v) for k, v in rates.items()}
    n = len(data.train_paths) + len(data.test_paths)
    what = f"480x640 JPEGs for a 224 px member, loader only"
    return [f"| 6. data: {what}: ens from the JPEGs (draft decode) / fastai's default | {r['jpeg']:.0f} / "
            f"{r['fastai']:.0f} images/s | **{r['jpeg'] / r['fastai']:.2f}** | > 1 |",
            f"| 6. data: {what}: prepared copy max_size=256 (built once in {prepared_s:.1f} s for {n} images) / "
            f"fastai's default | {r['prepared']:.0f} / {r['fastai']:.0f} images/s | **{r['prepared'] / r['fastai']:.2f}** "
            "| >= 4 |",
            f"| 6. data: {what}: decoded copy (built once in {decoded_s:.1f} s for {n} images) / fastai's default "
            f"| {r['decoded']:.0f} / {r['fastai']:.0f} images/s | **{r['decoded'] / r['fastai']:.1f}** | >= 20 |"]


if __name__ == "__main__":
    print("\n".join(main()))
