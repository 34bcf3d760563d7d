"""Shared by the benchmark scripts: a throw-away digits project, timing of commands, medians."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENS = [sys.executable, "-m", "pipelines.cli"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def digits_project(ensembles: dict[str, str]) -> Path:
    """A temporary project on the repo's digits data (built once in the repo's cache)."""
    subprocess.run(ENS + ["data", "digits"], cwd=REPO, check=True, capture_output=True, env=ENV)
    # ens's own modules as bytecode, like the installed libraries': with PYTHONDONTWRITEBYTECODE set (as in this
    # sandbox and some CI images) nothing writes pipelines/__pycache__, and every `ens` process would compile
    # its ~8k lines again (~0.1 s) where fastai, torch and a hand-written script's imports load .pyc files
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pipelines")], check=True, env=ENV)
    root = Path(tempfile.mkdtemp(prefix="ens-bench-"))
    (root / "competitions").mkdir()
    text = (REPO / "competitions/digits.yaml").read_text()
    (root / "competitions/digits.yaml").write_text(text + f"\ndata_dir: {REPO / 'cache/data/digits'}\n")
    for name, body in ensembles.items():
        path = root / "ensembles/digits" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=ENV)
    return time.perf_counter() - start, out.stdout


def trained_images_per_second(member, data) -> float:
    """ens's training throughput of `member` on `data`: images per second over the epochs after the first (the
    first warms up), timed by a fastai callback around each training phase."""
    from fastai.callback.core import Callback

    from pipelines.train import train_member

    class Clock(Callback):
        def __init__(self):
            self.images, self.seconds = 0, 0.0

        def before_train(self):
            self.start = time.perf_counter()

        def after_batch(self):
            if self.training and self.epoch >= 1:
                self.images += len(self.xb[0])

        def after_train(self):
            if self.epoch >= 1:
                self.seconds += time.perf_counter() - self.start

    clock = Clock()
    train_member(member, data, cbs=[clock])
    return clock.images / clock.seconds


def median(values) -> float:
    return statistics.median(values)


ONE_MEMBER = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 4, lr: 0.005, batch_size: 64, num_workers: 0,
           aug_transforms: {do_flip: false, max_rotate: 10, max_warp: 0.1, max_lighting: 0.2}, tta: {n: 4, beta: 0.25}}
members:
  - {name: resnet, arch: test_resnet}
"""
