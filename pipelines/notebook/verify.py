"""The notebook run here before anything is uploaded: in a child process, on a /kaggle-like tree (the competition's
data and the dataset folder as inputs), with the network refused. Its CSV must equal the one `ens run` writes
from the cached test probabilities, and its measured time, scaled to the hidden test set, must fit the
competition's runtime limit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Competition
from ..errors import EnsError
from ..util import read_csv_rows
from .offline import TIMING

# sitecustomize of the child: every Internet socket refuses to connect, as in a code competition's notebook
_NO_NETWORK = '''import socket

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _refuse(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("network is disabled in this notebook (ens's local check of a code competition)")
    return _connect(self, address, *args)


def _refuse_ex(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        return 101  # ENETUNREACH
    return _connect_ex(self, address, *args)


socket.socket.connect, socket.socket.connect_ex = _refuse, _refuse_ex
'''


@dataclass
class LocalRun:
    csv: Path
    seconds: float      # the whole child process
    timing: dict        # what the notebook measured: images, load_seconds, predict_seconds
    log: str


def kaggle_tree(work: Path, comp: Competition, data_root: Path, dataset_folder: Path, dataset_slug: str) -> Path:
    """<work>/kaggle with input/<competition slug> and input/<dataset slug> (links to the real folders) and an empty
    working/; returns the root (the notebook's /kaggle)."""
    root = work / "kaggle"
    shutil.rmtree(root, ignore_errors=True)
    (root / "input").mkdir(parents=True)
    (root / "working").mkdir()
    (root / "input" / (comp.kaggle or comp.name)).symlink_to(data_root.resolve(), target_is_directory=True)
    (root / "input" / dataset_slug).symlink_to(dataset_folder.resolve(), target_is_directory=True)
    return root


def run_script(script: Path, root: Path, output: str, timeout: float) -> LocalRun:
    """Run the notebook's script as Kaggle would (cwd /kaggle/working), with the network refused and the
    project's own copy of ens out of reach: it must import ens from the dataset's wheel."""
    guard = root.parent / "no-network"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(_NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("KAGGLE_", "HTTP_PROXY", "HTTPS_PROXY"))}
    env.update(ENS_KAGGLE_ROOT=str(root), PYTHONPATH=str(guard), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-P", str(script)], cwd=root / "working", env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise EnsError(f"the notebook ran here for more than {timeout:g} s without finishing; nothing was uploaded")
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    out = root / "working" / output
    if proc.returncode != 0 or not out.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnsError(f"the notebook failed here before any upload ({last}); its log: "
                       f"{_save_log(root, log)}; nothing was uploaded")
    timing = json.loads((root / "working" / TIMING).read_text())
    return LocalRun(out, seconds, timing, log)


def _save_log(root: Path, log: str) -> Path:
    path = root.parent / "notebook.log"
    path.write_text(log)
    return path


# how far Kaggle's run of the notebook may stray from the CSV checked here: another device's arithmetic moves a
# probability in its last digits, never a label, nor a probability by more than this
KAGGLE_TOLERANCE = 1e-3


def submission_difference(notebook_csv: Path, expected_csv: Path, comp: Competition,
                          tolerance: float = 1e-5) -> str | None:
    """How the notebook's CSV differs from the expected one (other header, ids or order; another label; a
    probability further than `tolerance`), in a phrase naming the first difference; None when it does not."""
    got, want = read_csv_rows(notebook_csv), read_csv_rows(expected_csv)
    if got[:1] != want[:1] or len(got) != len(want):
        return (f"in shape ({len(got) - 1} rows and columns {got[:1]} where {len(want) - 1} rows and {want[:1]} "
                "were expected)")
    differ = []
    for a, b in zip(got[1:], want[1:]):
        if a[:1] != b[:1]:
            differ.append(f"id {a[:1]} where {b[:1]} was expected")
        elif comp.submission_kind == "probability":
            try:
                far = abs(float(a[-1]) - float(b[-1])) > tolerance
            except ValueError:
                far = True
            if far:
                differ.append(f"{a[0]}: {a[-1]} vs {b[-1]}")
        elif a[1:] != b[1:]:
            differ.append(f"{a[0]}: {','.join(a[1:])} vs {','.join(b[1:])}")
    if differ:
        return f"on {len(differ)} of {len(want) - 1} rows (first {differ[0]})"
    return None


def same_submission(notebook_csv: Path, expected_csv: Path, comp: Competition, tolerance: float = 1e-5) -> None:
    """The notebook's CSV equals the expected one: the same header and ids in order, the same labels (or the same
    probabilities within `tolerance`: float32 sums in another order); else a one-line error naming the first
    difference."""
    difference = submission_difference(notebook_csv, expected_csv, comp, tolerance)
    if difference:
        raise EnsError(f"the notebook's predictions differ from the cached ones {difference}: the notebook would "
                       "not submit what `ens run` validated; nothing was uploaded — report this as a bug of ens")


@dataclass
class Estimate:
    seconds: float       # the hidden test set's predicted run time
    limit: float         # the competition's limit, in seconds
    basis: str           # how it was estimated, for the user

    @property
    def share(self) -> float:
        return self.seconds / self.limit


def runtime_estimate(run: LocalRun, comp: Competition, device: str) -> Estimate:
    """The measured start-up plus the measured time per image times the hidden test set's size (the public one's
    when the competition does not state it). Measured on this machine's `device`: a GPU notebook is usually
    faster than a CPU here, so on a CPU this is an upper bound."""
    images = comp.notebook.hidden_test_images or run.timing["images"]
    per_image = run.timing["predict_seconds"] / max(run.timing["images"], 1)
    startup = run.seconds - run.timing["predict_seconds"]
    seconds = startup + per_image * images
    stated = "" if comp.notebook.hidden_test_images else " (notebook.hidden_test_images not set: the public count)"
    basis = (f"{per_image * 1000:.0f} ms per image on this machine's {device} × {images} hidden test images{stated} "
             f"+ {startup:.0f} s start-up")
    return Estimate(seconds, comp.notebook.runtime_hours * 3600, basis)
