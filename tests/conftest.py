"""Shared fixtures: the digits data built once per session, and throw-away project folders around it."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub miss would cost 45 s of retries; nothing here may download

# a suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would every `ens` the
# tests start: the Ctrl-C tests would then interrupt nothing. A handled signal is reset to the default at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]

TINY = """\
competition: digits
defaults:
  pretrained: false
  size: 32
  epochs: 1
  lr: 0.005
  batch_size: 64
  num_workers: 0
  aug_transforms: {do_flip: false, max_rotate: 10}
  tta: {n: 1}
members:
  - {name: convnext, arch: test_convnext}
  - {name: effnet, arch: test_efficientnet}
  - {name: resnet, arch: test_resnet}
"""


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory) -> Path:
    from pipelines.data import build_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    build_digits(root)
    return root


# one small member, for the cross-validation tests ("validation: cv\n" + ONE_RESNET: one model per fold)
ONE_RESNET = """\
competition: digits
defaults:
  pretrained: false
  size: 32
  epochs: 1
  lr: 0.005
  batch_size: 64
  num_workers: 0
  aug_transforms: {do_flip: false, max_rotate: 10}
  tta: {n: 0}
members:
  - {name: resnet, arch: test_resnet}
"""


def make_project(root: Path, digits_data: Path, ensembles: dict[str, str] | None = None, cv: str | None = None) -> Path:
    """A project folder: the repo's digits competition (pointed at the session's data, with `cv` as its
    cross-validation when given, e.g. "{folds: 3}": the later `cv:` key wins) and `ensembles`."""
    (root / "competitions").mkdir(parents=True)
    text = (REPO / "competitions" / "digits.yaml").read_text() + f"\ndata_dir: {digits_data}\n"
    (root / "competitions" / "digits.yaml").write_text(text + (f"cv: {cv}\n" if cv else ""))
    for name, body in (ensembles or {}).items():
        path = root / "ensembles" / "digits" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


@pytest.fixture
def project(tmp_path, digits_data) -> Path:
    return make_project(tmp_path / "project", digits_data, {"tiny": TINY})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digits_data):
    """The tiny ensemble trained once from cold: (project folder, RunResult)."""
    from pipelines.config import Project
    from pipelines.run import run_ensemble

    root = make_project(tmp_path_factory.mktemp("tiny") / "project", digits_data, {"tiny": TINY})
    return root, run_ensemble(Project(root), "digits/tiny.yaml")


def copy_project(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("submissions"))
    return dest


def ens(*args, cwd: Path, timeout=300, **kw) -> subprocess.CompletedProcess:
    """The real `ens` command in a subprocess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    env.pop("ENS_PROJECT", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)
