"""`ens init`: a competition's YAML and starter ensemble written from its data — class folders (digits, paddy), a
labels CSV, a probability competition, the refusals, and the Kaggle download — through the real CLI."""

import csv
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import ens
from fake_kaggle import FakeKaggle
from paddy_like import make_paddy_like
from pipelines.config import Project, load_competition, load_ensemble


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "competitions").mkdir(parents=True)
    return root


def _init(root: Path, *args):
    return ens("init", *args, cwd=root, timeout=120)


def _ok(out):
    assert out.returncode == 0, out.stderr
    return out


def _comp(root: Path, name: str):
    return load_competition(Project(root), name)


def _yaml_line(root: Path, name: str, key: str) -> str:
    """The line of competitions/NAME.yaml setting top-level `key` (with its comment)."""
    return next(l for l in (root / "competitions" / f"{name}.yaml").read_text().splitlines() if l.startswith(f"{key}:"))


def _png(path: Path, size=(16, 16), colour=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_csv(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _folders_data(root: Path, classes=("real", "fake"), per_class=4, n_test=3, sample_value="0.5") -> Path:
    """Class folders train_images/<class>/, test_images/ and a sample submission (image_id, label)."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / "train_images" / name / f"{name}_{i}.png", colour=(c * 60, 0, 0))
    ids = [f"t{i}.png" for i in range(n_test)]
    for i in ids:
        _png(root / "test_images" / i)
    _write_csv(root / "sample_submission.csv", [("image_id", "label"), *((i, sample_value) for i in ids)])
    return root


# --------------------------------------------------------------------------------------------- class folders
@pytest.mark.slow
def test_digits_folder_gives_a_yaml_whose_starter_runs(tmp_path, digits_data):
    root = _project(tmp_path)
    shutil.copytree(digits_data, root / "data" / "digits")
    out = _ok(_init(root, "--data", "data/digits", "digits2", "--no-pretrained"))
    comp = _comp(root, "digits2")
    assert comp.data_dir == "data/digits"  # inside the project: relative to it
    assert (comp.train.layout, comp.train.folder) == ("folders", "train_images")
    assert (comp.test_images, comp.test_id) == ("test_images", "name")
    assert (comp.id_column, comp.target_column, comp.submission_kind) == ("image_id", "label", "label")
    assert comp.expected.classes == 10 and comp.expected.image_size == (32, 32)
    assert (comp.expected.train_images, comp.expected.test_images) == (1438, 359)
    assert comp.kaggle is None and comp.submission == "csv"
    assert "# guessed:" in _yaml_line(root, "digits2", "submission")
    assert comp.metric == "accuracy" and "# guessed:" in _yaml_line(root, "digits2", "metric")
    _, ensemble, _ = load_ensemble(Project(root), "digits2/starter.yaml")
    (member,) = ensemble.members
    assert (member.arch, member.size, member.pretrained, member.decode) == ("convnext_tiny.fb_in22k", 32, False, True)
    assert "next: ens run digits2/starter.yaml" in out.stdout and "10 classes" in out.stdout

    run = _ok(ens("run", "digits2/starter.yaml", "members.convnext.epochs=1", "members.convnext.tta.n=0", cwd=root))
    assert "checked against the sample" in run.stdout
    (submission,) = (root / "submissions" / "digits2").glob("*-starter.csv")
    with open(submission) as f:
        assert sum(1 for _ in csv.DictReader(f)) == 359


def test_paddy_shaped_folder_outside_the_project(tmp_path):
    data = make_paddy_like(tmp_path / "paddy-data", per_class=2, n_test=3)
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "paddy2"))
    comp = _comp(root, "paddy2")
    assert comp.data_dir == str(data.resolve())  # outside the project: absolute
    assert comp.train.folder == "train_images" and comp.test_id == "name" and comp.expected.classes == 10
    assert comp.expected.image_size == (640, 480)  # [height, width] of the portrait JPEGs
    _, ensemble, _ = load_ensemble(Project(root), "paddy2/starter.yaml")
    assert ensemble.members[0].size == 224 and ensemble.members[0].pretrained is True


# --------------------------------------------------------------------------------------------- a labels CSV
def test_labels_csv_layout_with_stem_ids(tmp_path):
    data = tmp_path / "data"
    diagnoses = ["none", "mild", "severe"]
    rows = [("id", "site", "diagnosis")]
    for i in range(12):
        _png(data / "train" / f"a{i:03d}.png", size=(40, 30))
        rows.append((f"a{i:03d}", "left" if i % 2 else "right", diagnoses[i % 3]))
    _write_csv(data / "train.csv", rows)
    for i in range(4):
        _png(data / "test" / f"b{i:03d}.png", size=(40, 30))
    _write_csv(data / "sample_submission.csv", [("id", "diagnosis"), *((f"b{i:03d}", "none") for i in range(4))])
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "retina"))
    comp = _comp(root, "retina")
    t = comp.train
    assert (t.layout, t.csv, t.id_column, t.label_column, t.path_template) == ("csv", "train.csv", "id", "diagnosis",
                                                                             "train/{id}.png")
    assert (comp.test_images, comp.test_id, comp.id_column, comp.target_column) == ("test", "stem", "id", "diagnosis")
    assert comp.expected.classes == 3 and comp.expected.image_size == (30, 40)
    assert load_ensemble(Project(root), "retina/starter.yaml")[1].members[0].size == 32  # 30 px images: at least 32


def test_tif_images_are_found_and_their_type_written(tmp_path):
    """Histopathology-style data: TIFF files, which the default image types leave out: init finds them and writes
    image_extensions, so that training lists them too."""
    data = tmp_path / "data"
    for c, name in enumerate(("benign", "tumor")):
        for i in range(4):
            _png(data / "train" / name / f"{name}{i}.tif", colour=(c * 90, 0, 0))
    for i in range(3):
        _png(data / "test" / f"t{i}.tif")
    _write_csv(data / "sample_submission.csv", [("id", "label"), *((f"t{i}", "benign") for i in range(3))])
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "histo"))
    comp = _comp(root, "histo")
    assert comp.image_extensions == [".tif"] and comp.train.folder == "train" and comp.test_id == "stem"
    assert comp.expected.train_images == 8 and comp.expected.test_images == 3


def test_probability_competition_guesses_the_positive_class_and_roc_auc(tmp_path):
    data = _folders_data(tmp_path / "data", ("real", "fake"))
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "deepfake"))
    comp = _comp(root, "deepfake")
    assert (comp.submission_kind, comp.positive_class, comp.metric) == ("probability", "fake", "roc_auc")
    assert "# guessed:" in _yaml_line(root, "deepfake", "metric")
    assert "# guessed:" in _yaml_line(root, "deepfake", "positive_class")


# --------------------------------------------------------------------------------------------- refusals
def _refused(root: Path, name: str, *args, says: tuple[str, ...]):
    out = _init(root, *args)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in says:
        assert word in out.stderr, out.stderr
    assert not (root / "competitions" / f"{name}.yaml").exists() and not (root / "ensembles" / name).exists()
    return out


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    root = _project(tmp_path)
    empty = tmp_path / "empty"
    _write_csv(empty / "sample_submission.csv", [("id", "label"), ("x", "1")])
    _refused(root, "e", "--data", str(empty), "e", says=("no images", "train:"))

    two = tmp_path / "two"
    rows = [("id", "colour", "shape")]
    for i in range(10):
        _png(two / "train" / f"{i}.png")
        rows.append((str(i), "red" if i % 2 else "blue", "round" if i % 3 else "square"))
    _write_csv(two / "train.csv", rows)
    _png(two / "test" / "t.png")
    _write_csv(two / "sample_submission.csv", [("id", "colour"), ("t", "red")])
    _refused(root, "two", "--data", str(two), "two", says=("colour, shape", "train.label_column"))

    unmatched = _folders_data(tmp_path / "unmatched", ("cat", "dog"), sample_value="cat")
    _write_csv(unmatched / "sample_submission.csv", [("image_id", "label"), ("nothing_here.png", "cat")])
    _refused(root, "unmatched", "--data", str(unmatched), "unmatched", says=("test_images", "test_id"))

    ab = _folders_data(tmp_path / "ab", ("a", "b"))
    _refused(root, "ab", "--data", str(ab), "ab", says=("--positive-class",))
    _ok(_init(root, "--data", str(ab), "ab", "--positive-class", "b"))
    assert _comp(root, "ab").positive_class == "b"


def test_a_guess_training_would_reject_fails_at_init(tmp_path):
    data = _folders_data(tmp_path / "data", ("cat", "dog"), n_test=10, sample_value="cat")
    (data / "test_images" / "t9.png").unlink()  # 9 of the 10 sample ids still match: a guess, and a wrong one
    root = _project(tmp_path)
    out = _init(root, "--data", str(data), "pets")
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "fail training's checks" in out.stderr and "'t9.png'" in out.stderr and "test_id" in out.stderr


def test_existing_files_need_force(tmp_path):
    data = _folders_data(tmp_path / "data", ("cat", "dog"), sample_value="cat")
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "pets"))
    mine = "# edited by hand\n" + (root / "competitions/pets.yaml").read_text()
    (root / "competitions/pets.yaml").write_text(mine)
    out = _init(root, "--data", str(data), "pets")
    assert out.returncode != 0 and "--force" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (root / "competitions/pets.yaml").read_text() == mine  # untouched
    (root / "competitions/pets.yaml").unlink()  # the starter alone is enough to refuse
    assert "ensembles/pets/starter.yaml" in _init(root, "--data", str(data), "pets").stderr
    _ok(_init(root, "--data", str(data), "pets", "--force"))
    assert _comp(root, "pets").submission_kind == "label"


# --------------------------------------------------------------------------------------------- from Kaggle
def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


def _run_with_env(root: Path, env: dict, *args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def _kaggle_env(fake: FakeKaggle, tmp_path: Path) -> dict:
    """Only the fake server's credentials and proxy: the test's own HOME, TMPDIR and Kaggle config folder."""
    for d in ("home", "tmp", "kaggle-config"):
        (tmp_path / d).mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KAGGLE_") and k.lower() not in ("no_proxy", "https_proxy", "all_proxy")}
    env.update(fake.env(), HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), ENS_KAGGLE_TIMEOUT="20",
               KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle-config"))
    return env


def test_init_from_kaggle_downloads_and_asks_the_competition(tmp_path, digits_data):
    fake = FakeKaggle(slug="digits-comp", data_zip=_zip(digits_data)).start()
    fake.kernels_only, fake.evaluation_metric, fake.title = True, "Categorization Accuracy", "Digits on Kaggle"
    root = _project(tmp_path)
    try:
        out = _ok(_run_with_env(root, _kaggle_env(fake, tmp_path), "init", "digits-comp", "--no-pretrained"))
        fake.fail["GetCompetition"] = 500  # Kaggle cannot say: the YAML is still written, with guesses and a note
        down = _ok(_run_with_env(root, _kaggle_env(fake, tmp_path), "init", "digits-comp", "--name", "offline"))
    finally:
        fake.stop()
    comp = _comp(root, "digits-comp")
    assert comp.kaggle == "digits-comp" and comp.data_dir is None
    assert (root / "cache/data/digits-comp/train_images").is_dir()  # downloaded where training looks
    assert comp.train.layout == "folders" and comp.expected.classes == 10 and comp.test_id == "name"
    assert (comp.title, comp.metric, comp.submission) == ("Digits on Kaggle", "accuracy", "notebook")
    assert comp.notebook.hidden_test_images == 359 and comp.notebook.runtime_hours == 9  # the limits, guessed
    assert "# guessed:" not in _yaml_line(root, "digits-comp", "metric")
    assert "next: ens run digits-comp/starter.yaml" in out.stdout

    assert "could not ask Kaggle about 'digits-comp'" in down.stderr
    offline = _comp(root, "offline")
    assert offline.kaggle == "digits-comp" and offline.submission == "auto" and offline.title == "offline"
    assert "# guessed:" in _yaml_line(root, "offline", "metric")



# --------------------------------------------------------------------------------------------- odd files
def _labels_csv_data(data: Path) -> Path:
    rows = [("id", "diagnosis")]
    for i in range(12):
        _png(data / "train" / f"a{i:03d}.png", size=(40, 30))
        rows.append((f"a{i:03d}", ("none", "mild", "severe")[i % 3]))
    _write_csv(data / "train.csv", rows)
    for i in range(4):
        _png(data / "test" / f"b{i:03d}.png", size=(40, 30))
    _write_csv(data / "sample_submission.csv", [("id", "diagnosis"), *((f"b{i:03d}", "none") for i in range(4))])
    return data


def test_csvs_with_a_byte_order_mark_are_read_as_training_reads_them(tmp_path):
    """Issue 24 item 12: init read CSVs as utf-8-sig, training as plain UTF-8, where the BOM sticks to the first
    column's name ('\\ufeffid' is not 'id')."""
    from pipelines.data import check_sample_ids, list_test, list_train

    data = _labels_csv_data(tmp_path / "data")
    for name in ("train.csv", "sample_submission.csv"):
        (data / name).write_bytes(b"\xef\xbb\xbf" + (data / name).read_bytes())
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "retina"))
    comp = _comp(root, "retina")
    assert (comp.train.id_column, comp.id_column) == ("id", "id")
    paths, labels = list_train(comp, data)
    assert len(paths) == 12 and set(labels) == {"none", "mild", "severe"}
    check_sample_ids(comp, data, list_test(comp, data))


def test_a_latin1_csv_and_a_decompression_bomb_header_are_one_line(tmp_path):
    """Issue 24 item 13: a latin-1 train.csv was a UnicodeDecodeError traceback; a PNG whose header claims
    20000 x 20000 pixels a DecompressionBombError traceback (init reads the headers for the image size)."""
    import struct
    import zlib

    data = _labels_csv_data(tmp_path / "latin")
    (data / "train.csv").write_bytes((data / "train.csv").read_text().replace("mild", "légère").encode("latin-1"))
    root = _project(tmp_path)
    out = _refused(root, "latin", "--data", str(data), "latin", says=("train.csv", "not UTF-8"))

    data = _folders_data(tmp_path / "bomb", ("cat", "dog"), sample_value="cat")
    png = data / "train_images" / "cat" / "cat_0.png"
    raw = bytearray(png.read_bytes())  # IHDR (bytes 12..29): its width and height, and its CRC
    raw[16:24] = struct.pack(">II", 20000, 20000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    png.write_bytes(bytes(raw))
    out = _ok(_init(root, "--data", str(data), "bomb"))  # the size comes from the other images
    assert _comp(root, "bomb").expected.image_size == (16, 16) and "Traceback" not in out.stderr


def test_nested_class_folders_are_read_by_their_top_folder(tmp_path):
    """Issue 24 item 11: train/{cat,dog}/{batch1,batch2}/ was read as classes batch1 and batch2 of cat/, dog/
    dropped, exit 0. The classes are the folders under train/, their images at any depth (training agrees);
    at the top of the data folder, where it cannot tell, init refuses in one line."""
    from pipelines.data import list_train

    data = tmp_path / "data"
    for c, name in enumerate(("cat", "dog")):
        for batch in ("batch1", "batch2"):
            for i in range(3):
                _png(data / "train" / name / batch / f"{name}{batch}{i}.png", colour=(c * 60, 0, 0))
    for i in range(3):
        _png(data / "test" / f"t{i}.png")
    _write_csv(data / "sample_submission.csv", [("id", "label"), *((f"t{i}.png", "cat") for i in range(3))])
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "pets"))
    comp = _comp(root, "pets")
    assert comp.train.folder == "train" and comp.expected.classes == 2 and comp.expected.train_images == 12
    paths, labels = list_train(comp, data)
    assert sorted(set(labels)) == ["cat", "dog"] and labels.count("dog") == 6

    top = tmp_path / "top"
    shutil.copytree(data / "train", top)
    shutil.copytree(data / "test", top / "test")
    shutil.copy(data / "sample_submission.csv", top)
    _refused(root, "top", "--data", str(top), "top", says=("nested", "cat/", "folder: <"))


def test_a_folder_shared_by_training_and_test_images(tmp_path):
    """Issue 24 item 14: images/Train_* beside images/Test_* (labelled by train.csv) was refused ('name no test
    images'): the test images are those of the shared folder that the sample submission names, in init and in
    training alike (which listed the training images as test images too)."""
    from pipelines.data import check_sample_ids, list_test, list_train

    data = tmp_path / "data"
    rows = [("image_id", "label")]
    for i in range(10):
        _png(data / "images" / f"Train_{i}.png", colour=(i % 2 * 90, 0, 0))
        rows.append((f"Train_{i}", ("healthy", "rust")[i % 2]))
    _write_csv(data / "train.csv", rows)
    for i in range(4):
        _png(data / "images" / f"Test_{i}.png")
    _write_csv(data / "sample_submission.csv", [("image_id", "label"), *((f"Test_{i}", "healthy") for i in range(4))])
    root = _project(tmp_path)
    _ok(_init(root, "--data", str(data), "plants"))
    comp = _comp(root, "plants")
    assert (comp.train.path_template, comp.test_images, comp.test_id) == ("images/{id}.png", "images", "stem")
    assert (comp.expected.train_images, comp.expected.test_images) == (10, 4)
    test = list_test(comp, data)
    assert test == [f"images/Test_{i}.png" for i in range(4)]
    assert not set(test) & set(list_train(comp, data)[0])
    check_sample_ids(comp, data, test)


# --------------------------------------------------------------------------------------------- labels or probabilities
def test_zero_one_labels_scored_by_accuracy_are_submitted_as_labels(tmp_path):
    """Issue 24 item 7: 0/1 classes, a sample of 0s and Kaggle's metric accuracy gave submission_kind probability:
    the CSV would hold 0.734 where Kaggle compares labels. Accuracy and F1 score labels; a probability submission
    with them is refused in the YAML."""
    import pytest

    from pipelines.config import Competition
    from pipelines.errors import ConfigError
    from pipelines.init import infer

    data = _folders_data(tmp_path / "data", ("0", "1"), sample_value="0")
    base = Competition(name="cracks")
    for metric, kind in (("Categorization Accuracy", "label"), ("Macro F1 Score", "label"),
                         ("Area Under Receiver Operating Characteristic Curve", "probability")):
        draft = infer(data, base, {"evaluation_metric": metric}, None)[0]
        assert draft.comp.submission_kind == kind, metric
    draft = infer(data, base, None, None)[0]  # Kaggle not asked: the 0s name classes, so they are labels
    assert (draft.comp.submission_kind, draft.comp.metric) == ("label", "accuracy")
    assert "each a class's name" in draft.notes["submission_kind"]

    root = _project(tmp_path)
    (root / "competitions/cracks.yaml").write_text(
        f"data_dir: {data}\nsubmission_kind: probability\npositive_class: '1'\nmetric: accuracy\n")
    with pytest.raises(ConfigError) as info:
        _comp(root, "cracks")
    assert "submission_kind: label" in str(info.value) and "compares labels" in str(info.value)
