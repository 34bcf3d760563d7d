"""Benchmark: loading paddy-shaped 480x640 JPEGs for a 224 px member, raw against a prepared (shrunk) copy.

Both are fastai DataLoaders built by ens (the seed's augmentations, 2 workers on this 2-core machine), timed over
one pass of the training set, alternating, several repeats; medians and their ratio are printed. Goal (issue:
paddy): >= 4x for the copy Road to the Top used (max_size 256). Run: .venv/bin/python benchmarks/data_loading.py
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

from pipelines.config import Member, Prepare, Project, load_competition  # noqa: E402
from pipelines.data import dataloaders, load_data, prepare_data  # noqa: E402


def images_per_second(data, member) -> float:
    """Training images per second once the loader runs (the first batch, which starts the workers, excluded)."""
    dls = dataloaders(data, member, member.size)
    batches = iter(dls.train)
    next(batches)
    start, n = time.perf_counter(), 0
    for xb, _ in batches:
        n += len(xb)
    return n / (time.perf_counter() - start)


def main(per_class: int = 50, repeats: int = 3) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = make_paddy_like(tmp / "paddy", per_class=per_class, n_test=8)
        (tmp / "project/competitions").mkdir(parents=True)
        text = (HERE.parent / "competitions/paddy.yaml").read_text()
        (tmp / "project/competitions/paddy.yaml").write_text(text + f"\ndata_dir: {data_root}\n")
        project = Project(tmp / "project")
        data = load_data(project, load_competition(project, "paddy"))
        # batch augmentations run on the GPU in real use; here they would run on the CPU and hide what is
        # measured (decoding and resizing in the workers), so they are off
        member = Member(name="m", arch="resnet18", size=224, batch_size=32, num_workers=2, aug_transforms=None)
        copies = {}
        built = {}
        for max_size in (256, 480):
            start = time.perf_counter()
            copies[max_size] = prepare_data(data, Prepare(max_size=max_size), project.cache)
            built[max_size] = time.perf_counter() - start
        rates = {"raw": [], 256: [], 480: []}
        for _ in range(repeats):
            rates["raw"].append(images_per_second(data, member))
            for max_size, copy in copies.items():
                rates[max_size].append(images_per_second(copy, member))
        raw = statistics.median(rates["raw"])
        shutil.rmtree(tmp / "project", ignore_errors=True)
        n = len(data.train_paths) + len(data.test_paths)
        return [f"| 6. data: 480x640 JPEGs for a 224 px member, prepared copy max_size={m} / raw "
                f"(copy built once in {built[m]:.1f} s for {n} images) | {statistics.median(rates[m]):.0f} / {raw:.0f} "
                f"images/s | **{statistics.median(rates[m]) / raw:.2f}** | {'>= 4' if m == 256 else ''} |"
                for m in copies]


if __name__ == "__main__":
    print("\n".join(main()))
