"""One quantity, one number (issue 27 item 9): `ens cache ls` shows the kept weights beside each entry; `ens
ablate` uses one number of greedy rounds in every table; a member's time says what it holds."""

import json

import pytest

from conftest import copy_project, ens
from pipelines.config import Project


def test_cache_ls_shows_the_entry_and_its_kept_weights(project):
    cache = project / "cache" / "digits"
    entry, weights = cache / "e0e0e0e0e0", cache / "models" / "t1t1t1t1"
    entry.mkdir(parents=True)
    weights.mkdir(parents=True)
    (entry / "probs.npz").write_bytes(b"x" * 300_000)
    (weights / "model.pth").write_bytes(b"w" * 2_000_000)
    meta = {"key": "e0e0e0e0e0", "train_key": "t1t1t1t1", "member": {"name": "big", "arch": "test_resnet"},
            "key_fields": {"stages": [[32, 2]]}, "metrics": {"plain_accuracy": 0.9, "tta_accuracy": 0.91},
            "timings": {"train_seconds": 3.0, "predict_seconds": 1.0}, "created": "2026-12-04T12:00:00", "cv": None}
    (entry / "meta.json").write_text(json.dumps(meta))
    out = ens("cache", "ls", "digits", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "┃ MB " in out.stdout and "┃ weights ┃" in out.stdout
    line = next(line for line in out.stdout.splitlines() if "e0e0e0e0e0" in line)
    assert "0.30" in line and "2.00" in line
    assert "in all: entries 0.3 MB, kept weights 2.0 MB" in out.stdout


@pytest.mark.slow
def test_ablate_uses_the_ensembles_rounds_in_every_table(tiny_run, tmp_path):
    from pipelines.ablate import ablate

    root = copy_project(tiny_run[0], tmp_path / "p")
    r = ablate(Project(root), "digits/tiny.yaml", cached_only=True)
    assert r.greedy_rounds == r.gathered.ensemble.combine.rounds == 100
    greedy = next(m for m in r.methods if m.method == "greedy")
    assert greedy.in_sample == pytest.approx(r.greedy_score)  # the same blend, the same number
    out = ens("ablate", "digits/tiny.yaml", "--cached-only", "--rounds", "7", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "(7 rounds, Caruana" in out.stdout and "greedy and hill climbing: 7 rounds" in out.stdout
