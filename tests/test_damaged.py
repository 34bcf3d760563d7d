"""Damaged images and sample ids without a test image are found when the data is loaded, before any training:
one line naming them and the fix (not "OSError: image file is truncated" mid-epoch, not a missing id after every
member has trained)."""

import shutil

import pytest

from conftest import ens, make_project
from pipelines import data as data_module
from pipelines.config import Project, load_competition
from pipelines.data import load_data
from pipelines.errors import EnsError

ONE = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 1, batch_size: 64, num_workers: 0, tta: {n: 1},
           aug_transforms: {do_flip: false}}
members:
  - {name: resnet, arch: test_resnet}
"""


@pytest.fixture
def damaged(tmp_path, digits_data):
    """A project on a copy of the digits data with one truncated PNG and one text file named .png among the
    training images: (project folder, data folder, the two relative paths)."""
    data = tmp_path / "digits"
    shutil.copytree(digits_data, data)
    truncated = sorted(data.glob("train_images/3/*.png"))[0]
    truncated.write_bytes(truncated.read_bytes()[:60])
    text = data / "train_images" / "7" / "notes.png"
    text.write_text("not an image\n")
    root = make_project(tmp_path / "p", data, {"one": ONE})
    return root, data, [truncated.relative_to(data).as_posix(), text.relative_to(data).as_posix()]


def _set(root, line):
    comp = root / "competitions" / "digits.yaml"
    comp.write_text(comp.read_text() + line + "\n")


def test_damaged_training_images_stop_load_data_with_one_line(damaged):
    root, _, bad = damaged
    project = Project(root)
    with pytest.raises(EnsError) as e:
        load_data(project, load_competition(project, "digits"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("competitions/digits.yaml: 2 training images cannot be decoded")
    assert all(p in message for p in bad) and "image file is truncated" in message, message
    assert "damaged_images: skip" in message and "replace or delete them" in message, message


def test_damaged_training_images_end_ens_run_before_any_epoch(damaged):
    root, _, bad = damaged
    result = ens("run", "digits/one.yaml", "--no-submit", cwd=root)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 training images cannot be decoded" in lines[0] and bad[0] in lines[0], lines
    assert not list((root / "cache" / "digits").glob("*/meta.json"))  # nothing trained


@pytest.mark.slow
def test_skip_leaves_damaged_images_out_of_training(damaged, digits_data):
    root, data, bad = damaged
    _set(root, "damaged_images: skip")
    project = Project(root)
    comp = load_competition(project, "digits")
    d = load_data(project, comp)
    other = Project(make_project(root.parent / "intact", digits_data))
    intact = load_data(other, load_competition(other, "digits"))
    # one of the digits truncated, one text file added: one image fewer than the intact data
    assert len(d.train_paths) == len(intact.train_paths) - 1 == 1437 and not set(bad) & set(d.train_paths)
    assert d.fingerprint != intact.fingerprint and d.test_paths == intact.test_paths
    result = ens("run", "digits/one.yaml", "--no-submit", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "leaving 2 damaged training images out (damaged_images: skip)" in result.stderr
    assert "checked against the sample" in result.stdout


def test_a_damaged_test_image_is_always_an_error(damaged):
    root, data, _ = damaged
    _set(root, "damaged_images: skip")
    victim = sorted(data.glob("test_images/*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:50])
    project = Project(root)
    with pytest.raises(EnsError) as e:
        load_data(project, load_competition(project, "digits"))
    message = str(e.value)
    assert "\n" not in message and "1 test image cannot be decoded" in message and victim.name in message, message
    assert "every test image" in message, message


def test_verification_is_memoised_per_data_fingerprint(tmp_path, digits_data, monkeypatch):
    data = tmp_path / "digits"
    shutil.copytree(digits_data, data)
    project = Project(make_project(tmp_path / "p", data))
    comp = load_competition(project, "digits")
    decoded = []
    real = data_module._decode_problem
    monkeypatch.setattr(data_module, "_decode_problem", lambda path: decoded.append(path) or real(path))
    first = load_data(project, comp)
    assert len(decoded) == 1797  # every training and test image, once
    assert load_data(project, comp).fingerprint == first.fingerprint and len(decoded) == 1797  # memoised
    victim = sorted(data.glob("train_images/0/*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # new content: a new fingerprint, verified again
    with pytest.raises(EnsError, match="1 training image cannot be decoded"):
        load_data(project, comp)
    assert len(decoded) == 2 * 1797
    assert list((project.cache / "fingerprints").glob("digits*.json"))


def test_sample_ids_without_a_test_image_stop_before_training(tmp_path, digits_data):
    data = tmp_path / "digits"
    shutil.copytree(digits_data, data)
    gone = sorted(data.glob("test_images/*.png"))[:3]
    for p in gone:
        p.unlink()
    root = make_project(tmp_path / "p", data)
    project = Project(root)
    with pytest.raises(EnsError) as e:
        load_data(project, load_competition(project, "digits"))
    message = str(e.value)
    assert "\n" not in message and f"3 ids of the sample submission have no test image, first '{gone[0].name}'" \
        in message, message
    assert "test_id" in message and "test_images" in message, message
    result = ens("data", "digits", cwd=root)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and gone[0].name in result.stderr
