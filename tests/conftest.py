"""Shared fixtures: the digits data built once per session, and throw-away project folders around it."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


def ens(*args, cwd: Path, timeout=300, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The real `ens` command in a subprocess (never joining a Ray cluster unless `env_extra` says)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    env.pop("ENS_PROJECT", None)
    env.pop("RAY_ADDRESS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


# Ray in tests: every listener on 127.0.0.1, and temp folders with short paths (Unix sockets live there: pytest's
# tmp_path would exceed the socket path limit)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture
def ray_tmp():
    """A short temporary folder for a Ray cluster a test (or the `ens` it starts) makes itself."""
    folder = tempfile.mkdtemp(prefix="ensray-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray cluster, joined by this process: 2 CPUs and 2 declared GPUs (Ray gives each task
    a CUDA_VISIBLE_DEVICES of its own, on a CPU machine too; the tasks train on the CPU)."""
    import ray

    folder = tempfile.mkdtemp(prefix="ensray-", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=folder,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def small_disk(tmp_path):
    """mount(folder, size): a real small filesystem (a full disk is met for real, not faked): a tmpfs of `size`
    mounted at `folder` (created), unmounted after the test; skipped, saying why, where mounting is impossible."""
    mounted = []

    def mount(folder: Path, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
