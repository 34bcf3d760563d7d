"""`ens bench` and `ens eval --on FOLDER` on kept digits members: numbers checked for sense."""

import shutil

import numpy as np
import pytest

from conftest import TINY, ens, make_project
from pipelines.config import Project
from pipelines.evaluate import bench, evaluate_on
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow

KEPT = TINY.replace("  tta: {n: 1}\n", "  tta: {n: 1}\n  keep_model: true\n").replace(
    "  - {name: resnet, arch: test_resnet}\n", "")


@pytest.fixture(scope="module")
def kept(tmp_path_factory, digits_data):
    root = make_project(tmp_path_factory.mktemp("kept") / "p", digits_data, {"kept": KEPT, "tiny": TINY})
    return root, run_ensemble(Project(root), "digits/kept.yaml")


def test_bench_reports_sizes_that_match_the_saved_files(kept):
    root, result = kept
    rows, device = bench(Project(root), "digits/kept.yaml", batch=16, repeats=2)
    assert device == "cpu" and [r.name for r in rows] == ["convnext", "effnet"]
    for r, o in zip(rows, result.members):
        assert r.disk_mb == pytest.approx(o.entry.model_path.stat().st_size / 1e6)
        assert r.memory_mb == pytest.approx(r.disk_mb, rel=0.05)  # the state dict is the weights, plus a header
        assert r.valid_accuracy == o.entry.meta["metrics"]["plain_accuracy"]
        assert r.ms_per_image_batched > 0 and r.ms_per_image_batch1 > 0  # which is faster: benchmarks/bench_batching.py
        assert r.params > 10_000
    out = ens("bench", "digits/kept.yaml", cwd=root)
    assert out.returncode == 0 and (root / "submissions/digits/bench-kept.csv").is_file(), out.stderr


def test_eval_on_the_validation_images_reproduces_the_validation_metrics(kept, digits_data, tmp_path):
    root, result = kept
    folder = tmp_path / "again"
    for rel in result.members[0].entry.arrays["valid_ids"]:
        dest = folder / rel.split("/")[1] / rel.split("/")[2]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(digits_data / rel, dest)
    results, n, _ = evaluate_on(Project(root), "digits/kept.yaml", folder)
    assert n == len(result.members[0].entry.arrays["valid_ids"])
    for name in ("convnext", "effnet"):
        there, valid = results[name]["accuracy"]
        assert there == pytest.approx(valid, abs=1e-9)  # the plain pass is deterministic
        there, valid = results[name]["TTA accuracy"]
        assert abs(there - valid) < 0.05  # TTA draws other augmentations
    (folder / "cat").mkdir()
    out = ens("eval", "digits/kept.yaml", "--on", str(folder), cwd=root)
    assert out.returncode == 1 and "class folder 'cat' is not a class of the competition" in out.stderr


def test_members_without_kept_weights_are_named(kept):
    root, _ = kept
    out = ens("bench", "digits/tiny.yaml", "defaults.keep_model=false", cwd=root, timeout=600)
    assert out.returncode == 1 and "resnet kept none: set keep_model: true" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
