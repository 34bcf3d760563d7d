"""Decoded copies (`decode: true`) and the cheaper JPEG path: the same pixels, so the same training and the same
predictions; rebuilt when the data change; a build killed midway leaves nothing that is used."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, ens, make_project, ONE_RESNET
from paddy_like import make_paddy_like
from pipelines.config import Member, Project, load_competition
from pipelines.data import load_data
from pipelines.data.decoded import decoded_folder, decoded_images, load_item, open_image

pytestmark = pytest.mark.slow


def _paddy_project(root, data_root):
    (root / "competitions").mkdir(parents=True)
    text = (REPO / "competitions/paddy.yaml").read_text()
    (root / "competitions/paddy.yaml").write_text(text + f"\ndata_dir: {data_root}\n")
    return Project(root)


@pytest.fixture(scope="module")
def paddy(tmp_path_factory):
    data_root = make_paddy_like(tmp_path_factory.mktemp("paddy-data") / "paddy", per_class=3, n_test=6)
    project = _paddy_project(tmp_path_factory.mktemp("paddy") / "project", data_root)
    return project, load_data(project, load_competition(project, "paddy"))


def _train_and_predict(member, data):
    from pipelines.predict import predict_member
    from pipelines.train import train_member

    trained = train_member(member, data)
    return trained.history, predict_member(trained.learn, member, data)[0]


@pytest.mark.parametrize("which", ["digits", "paddy"])
def test_decoded_copy_trains_and_predicts_exactly_as_the_images(which, paddy, tmp_path, digits_data):
    """Training, validation and TTA on the decoded copy give the JPEG path's numbers bit for bit: digits (32 px,
    no resize) and paddy-shaped 480x640 JPEGs at 64 px (draft decode and a squish), with augmentation."""
    if which == "digits":
        project = Project(make_project(tmp_path / "project", digits_data))
        data, size = load_data(project, load_competition(project, "digits")), 32
    else:
        data, size = paddy[1], 64
    results = {}
    for decode in (False, True):
        member = Member(name="m", arch="test_resnet", pretrained=False, size=size, epochs=1, batch_size=8,
                        num_workers=0, lr=0.005, tta={"n": 2}, decode=decode)
        results[decode] = _train_and_predict(member, data)
    assert [r["train_loss"] for r in results[True][0]] == [r["train_loss"] for r in results[False][0]]
    for key, value in results[False][1].items():
        np.testing.assert_array_equal(results[True][1][key], value, err_msg=key)
    assert len(list((data.cache_root / "decoded").glob(f"{data.competition.name}/{size}x{size}-*"))) == 1


def test_decoded_copy_holds_the_jpeg_paths_pixels_and_draft_decodes_at_half(paddy):
    project, data = paddy
    decoded = decoded_images(data, (64, 48))
    images = decoded.images
    assert images.shape == (len(data.train_paths) + len(data.test_paths), 64, 48, 3) and images.dtype == np.uint8
    for path in (data.train_paths[0], data.test_paths[-1]):
        row = decoded.rows([path])[0]
        np.testing.assert_array_equal(images[row], np.asarray(load_item(data.root / path, (64, 48))))
    jpeg = data.root / data.train_paths[0]  # 480x640 portrait
    assert open_image(jpeg, (224, 224)).size == (240, 320)  # DCT-scaled decode at 1/2
    assert open_image(jpeg, (299, 299)).size == (480, 640)  # more than half: a full decode
    full = np.asarray(Image.open(jpeg).convert("RGB").resize((224, 224), Image.BILINEAR), dtype="float32")
    drafted = np.asarray(load_item(jpeg, (224, 224)), dtype="float32")
    assert 0 < np.abs(full - drafted).mean() < 4  # measured 2.4 grey levels on these noisy images (σ = 25)


def test_decoded_copy_is_rebuilt_when_the_data_change(tmp_path):
    data_root = make_paddy_like(tmp_path / "paddy", per_class=1, n_test=2)
    project = _paddy_project(tmp_path / "project", data_root)
    before = load_data(project, load_competition(project, "paddy"))
    first = decoded_images(before, (32, 32))
    changed = before.train_paths[0]
    Image.new("RGB", (480, 640), (255, 0, 0)).save(data_root / changed)
    after = load_data(project, load_competition(project, "paddy"))
    second = decoded_images(after, (32, 32))
    assert second.folder != first.folder and first.folder.is_dir()
    row = second.rows([changed])[0]
    red = lambda pixels: pixels.reshape(-1, 3).mean(0) @ [1, -1, -1] > 240  # noqa: E731 - a red JPEG: ≈ (254, 0, 0)
    assert red(second.images[row]) and not red(first.images[row])


def _processes_running(command_line: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and command_line in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_build_killed_midway_is_swept_and_never_used(tmp_path):
    data_root = make_paddy_like(tmp_path / "paddy", per_class=20, n_test=40)  # 240 JPEGs: a build of seconds
    project = _paddy_project(tmp_path / "project", data_root)
    data = load_data(project, load_competition(project, "paddy"))
    dest = decoded_folder(data, (320, 320))
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "from pathlib import Path\n"
              "from pipelines.config import Project, load_competition\n"
              "from pipelines.data import load_data\n"
              "from pipelines.data.decoded import decoded_images\n"
              f"p = Project(Path({str(project.root)!r}))\n"
              "decoded_images(load_data(p, load_competition(p, 'paddy')), (320, 320))\n")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=project.root)
    deadline = time.time() + 120
    while not list(dest.parent.glob("*.building-*/images.npy")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)  # midway through decoding
    assert child.poll() is None, "the build ended before it could be killed: give it more images"
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
    # its decoding workers die with it: left alive, they would hold its lock and every later build would wait
    deadline = time.time() + 10
    while _processes_running(script) and time.time() < deadline:
        time.sleep(0.1)
    assert not _processes_running(script)
    assert list(dest.parent.glob("*.building-*")) and not dest.exists()  # a half-built copy, not in place
    decoded = decoded_images(data, (320, 320))
    assert decoded.folder == dest and not list(dest.parent.glob("*.building-*"))
    row = decoded.rows([data.train_paths[-1]])[0]
    np.testing.assert_array_equal(decoded.images[row], np.asarray(load_item(data.root / data.train_paths[-1], (320, 320))))


def test_resize_is_skipped_for_images_already_at_the_target_size(monkeypatch):
    """No crop, pad or resize for an image that has the target size (fastai's Resize pads by zero pixels
    through torchvision there), whatever the method."""
    import fastai.vision.augment as augment
    from fastai.vision.all import PILImage

    from pipelines.data.loaders import _image_transforms

    _, Presize = _image_transforms()
    image = PILImage(Image.new("RGB", (48, 64)))
    monkeypatch.setattr(augment, "tvpad", lambda *a, **k: pytest.fail("padded an image already at its size"))
    for method in ("crop", "pad", "squish"):
        assert Presize((64, 48), method=method)(image, split_idx=0) is image
    with pytest.raises(pytest.fail.Exception):
        Presize((64, 64), method="pad")(image, split_idx=0)  # other sizes still go through fastai's Resize


def test_tta_loads_each_image_once(paddy, monkeypatch):
    """n augmented passes and the plain one over batches loaded once (fastai's `tta` decodes every image again
    for each pass)."""
    from pipelines.data import dataloaders, test_loader
    from pipelines.models import build_learner
    from pipelines.predict import tta_probs

    _, data = paddy
    member = Member(name="m", arch="test_resnet", pretrained=False, size=32, num_workers=0, tta={"n": 3})
    learn, _ = build_learner(dataloaders(data, member, 32), member, metrics=[])
    opened = []
    from pipelines.data import fastai_parts  # the item opener's module

    real = fastai_parts.open_image
    monkeypatch.setattr(fastai_parts, "open_image", lambda path, *a: opened.append(path) or real(path, *a))
    out = tta_probs(learn, test_loader(learn.dls, data), member)
    assert out["aug"].shape == out["plain"].shape == (len(data.test_paths), 10)
    assert not np.allclose(out["aug"], out["plain"])  # the augmented passes were augmented
    assert sorted(opened) == sorted(str(data.root / p) for p in data.test_paths)


def test_decode_is_run_only_a_decoded_run_fills_the_cache_of_the_jpeg_path(tmp_path, digits_data):
    """`ens run` with decode: true (DataLoader workers on) trains; the same member without decode is then read
    from the cache: the key does not hold `decode`, because the pixels are the same."""
    root = make_project(tmp_path / "project", digits_data, {"one": ONE_RESNET})
    first = ens("run", "digits/one.yaml", "defaults.decode=true", "defaults.num_workers=2", "--no-submit", cwd=root)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "decoding 1797 images once at 32x32" in first.stderr
    second = ens("run", "digits/one.yaml", "--no-submit", cwd=root)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "(0 trained, 1 cached" in second.stdout


def test_decode_refuses_a_random_resize():
    with pytest.raises(ValueError, match="resize.method squish or drop decode"):
        Member(name="m", arch="test_resnet", decode=True, resize={"method": "crop"})
