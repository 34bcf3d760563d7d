"""The embedded digits build, layouts, the fixed validation split and the data fingerprint."""

import csv
import hashlib
import shutil
from collections import Counter

import pytest
from PIL import Image

from conftest import make_project
from pipelines.config import Competition, Project, load_competition
from pipelines.data import build_digits, list_train, load_data, validation_mask
from pipelines.errors import EnsError


def _tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_digits_build_is_deterministic_kaggle_shaped_and_keeps_answers_apart(digits_data, tmp_path):
    again = tmp_path / "digits"
    build_digits(again)
    assert _tree_digest(again) == _tree_digest(digits_data)
    train = list(digits_data.glob("train_images/*/*.png"))
    test = list(digits_data.glob("test_images/*.png"))
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert sorted({p.parent.name for p in train}) == [str(d) for d in range(10)]
    image = Image.open(test[0])
    assert image.size == (32, 32) and image.mode == "RGB"
    with open(digits_data / "sample_submission.csv") as f:
        sample = list(csv.DictReader(f))
    with open(digits_data / "solution.csv") as f:
        solution = list(csv.DictReader(f))
    assert {r["image_id"] for r in sample} == {r["image_id"] for r in solution} == {p.name for p in test}
    assert {r["label"] for r in sample} == {"0"}  # the sample gives nothing away
    assert len(set(r["label"] for r in solution)) == 10
    assert not list(digits_data.glob("*.building-*"))


def test_validation_split_is_fixed_stratified_and_seeded():
    paths = [f"train/{c}/{i}.png" for c in "abc" for i in range(50)]
    labels = [p.split("/")[1] for p in paths]
    mask = validation_mask(paths, labels, 0.2, 42, True)
    assert mask == validation_mask(paths, labels, 0.2, 42, True)
    assert Counter(l for l, v in zip(labels, mask) if v) == {"a": 10, "b": 10, "c": 10}
    assert mask != validation_mask(paths, labels, 0.2, 7, True)
    # adding an image never moves the others: the split is per image, not per position
    more = validation_mask(paths + ["train/a/new.png"], labels + ["a"], 0.2, 42, False)
    assert sum(more) == round(151 * 0.2)


def test_load_data_splits_digits_once_for_everyone(project):
    d = load_data(Project(project), load_competition(Project(project), "digits"))
    per_class = Counter(d.train_labels)
    assert len(d.train_paths) == 1438
    assert sum(d.is_valid) == sum(round(n * 0.2) for n in per_class.values())
    assert d.vocab == [str(i) for i in range(10)]
    assert d.test_ids[0] == "test_0000.png"
    d2 = load_data(Project(project), load_competition(Project(project), "digits"))
    assert d2.is_valid == d.is_valid and d2.fingerprint == d.fingerprint


def test_fingerprint_follows_content(tmp_path, digits_data):
    data = tmp_path / "digits"
    shutil.copytree(digits_data, data)
    root = make_project(tmp_path / "p", data)
    comp = load_competition(Project(root), "digits")
    first = load_data(Project(root), comp).fingerprint
    victim = next(data.glob("test_images/*.png"))
    Image.new("RGB", (32, 32)).save(victim)
    assert load_data(Project(root), comp).fingerprint != first


def test_labels_csv_layout(tmp_path, digits_data):
    data = tmp_path / "csvdata"
    (data / "train").mkdir(parents=True)
    rows = []
    for p in sorted(digits_data.glob("train_images/*/*.png"))[:40]:
        shutil.copy(p, data / "train" / p.name)
        rows.append((p.stem, p.parent.name))
    with open(data / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id", "digit"), *rows])
    comp = Competition(name="c", train={"layout": "csv", "csv": "train.csv", "id_column": "id",
                                        "label_column": "digit", "path_template": "train/{id}.png"})
    paths, labels = list_train(comp, data)
    assert len(paths) == 40 and dict(zip(paths, labels))[f"train/{rows[0][0]}.png"] == rows[0][1]
    (data / paths[3]).unlink()
    with pytest.raises(EnsError, match="1 images named by train.csv are missing"):
        list_train(comp, data)
    with pytest.raises(ValueError, match="layout 'csv' needs"):
        Competition(name="c", train={"layout": "csv"})
