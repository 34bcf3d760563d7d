"""`ens plan` before the data is downloaded, the FLOPs progressive resizing saves, the decoded copies' disk, and
the paddy ensembles' stages. The FLOP memo is written by the tests (exact figures, no network built), so the
arithmetic is checked against hand-computed numbers."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import REPO, ens, make_project
from pipelines.config import Project, load_ensemble
from pipelines.plan import decoded_bytes, flops_memo_path, plan_ensemble, render

# a Kaggle competition whose data is not downloaded, with the facts copied from its page
REMOTE = """\
kaggle: some-competition
expected: {classes: 5, train_images: 1000, test_images: 200, image_size: [640, 480]}
"""

# staged and not, pretrained (one frozen epoch at the first size) and not, decoded copies shared at 64
STAGED = """\
competition: remote
defaults: {arch: test_resnet, pretrained: false, decode: true}
members:
  - {name: staged, stages: [[32, 3], [64, 2]]}
  - {name: frozen, pretrained: true, freeze_epochs: 1, stages: [[32, 3], [64, 2]]}
  - {name: plain, size: 64, epochs: 5}
  - {name: jpeg, size: 48, epochs: 1, decode: false}
"""

GFLOPS = {"32": 1e9, "48": 2.25e9, "64": 4e9}  # forward FLOPs per image the memo says test_resnet takes


def write_memo(path: Path, classes: int) -> Path:
    """test_resnet's params and FLOPs for every (final size, classes) the tests plan: nothing is built."""
    table = {f"test_resnet|{final}|{classes}": {"params": 1000 + classes, "flops": GFLOPS, "errors": {}}
             for final in ("48", "64")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table))
    return path


def refuse_build(*a):
    raise AssertionError("built a network: the memo holds every figure")


def remote_project(root: Path, digits_data: Path, competition: str = REMOTE, ensemble: str = STAGED) -> Path:
    make_project(root, digits_data)
    (root / "competitions" / "remote.yaml").write_text(competition)
    (root / "ensembles" / "remote").mkdir(parents=True)
    (root / "ensembles" / "remote" / "a.yaml").write_text(ensemble)
    return root


def text(plan) -> str:
    console = Console(record=True, width=250)
    render(plan, console)
    return console.export_text()


@pytest.mark.slow
def test_plan_without_the_data_prints_what_is_known_and_exits_0(tmp_path, digits_data, monkeypatch):
    root = remote_project(tmp_path / "p", digits_data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the memo the subprocess reads
    write_memo(flops_memo_path(), classes=5)
    result = ens("plan", "remote/a.yaml", cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for name in ("staged", "frozen", "plain", "jpeg"):
        assert name in out
    assert "32×3 → 64×2" in out and "1G → 4G" in out  # stages and FLOPs per image at each stage size
    assert "FLOPs saved" in out and "45%" in out and "50%" in out
    assert "unknown" in out and "to train" not in out.replace("to train them all", "")  # cached or not: unknown
    note = [line for line in out.splitlines() if line.startswith("not known before the data is downloaded")]
    assert len(note) == 1, out
    assert "cache/data/remote is missing" in note[0] and "`ens data remote` downloads it" in note[0]
    assert "classes and image counts from competitions/remote.yaml expected:" in note[0]
    assert not (root / "cache" / "data" / "remote").exists()  # nothing downloaded


def test_without_expected_the_class_count_is_a_stated_lower_bound(tmp_path, digits_data):
    root = remote_project(tmp_path / "p", digits_data, competition="kaggle: some-competition\n")
    plan = plan_ensemble(Project(root), "remote/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=2),
                         build=refuse_build)
    assert plan.classes_from == "placeholder" and plan.n_classes == 2 and plan.counts_from is None
    assert plan.n_train is None and plan.est_seconds is None and plan.decoded_total is None
    assert plan.members[0].saved == pytest.approx(0.45)  # a ratio: no image count needed
    out = text(plan)
    assert "≥1k" in out and "≥1G → ≥4G" in out
    assert "the class count (params and FLOPs counted with a 2-class head: lower bounds, marked ≥)" in out
    assert "no time estimate (the image counts are unknown)" in out
    assert "copy expected: {classes: N, train_images: N, test_images: N}" in out


def test_flops_saved_by_stages_match_hand_arithmetic(tmp_path, digits_data):
    root = remote_project(tmp_path / "p", digits_data)
    plan = plan_ensemble(Project(root), "remote/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=5),
                         build=refuse_build)
    staged, frozen, plain, jpeg = plan.members
    # per training image, in GFLOP: 3 epochs at 32 (1) + 2 at 64 (4), against 5 at 64
    assert staged.train_gflops == pytest.approx(3 * 1 + 2 * 4)
    assert staged.final_size_gflops == pytest.approx(5 * 4)
    assert staged.saved == pytest.approx(1 - 11 / 20)
    # pretrained: one frozen epoch at the first stage's size, against one at the final size
    assert frozen.train_gflops == pytest.approx(1 + 11) and frozen.final_size_gflops == pytest.approx(4 + 20)
    assert frozen.saved == pytest.approx(0.5)
    assert plain.saved == pytest.approx(0) and not plain.staged
    # the ensemble: × the 800 training images of expected: (1000, 20 % held out)
    assert plan.n_train == 800 and plan.n_valid == 200 and plan.n_test == 200
    with_stages, at_final = plan.train_flops
    assert with_stages == pytest.approx(800e9 * (11 + 12 + 20 + 2.25))
    assert at_final == pytest.approx(800e9 * (20 + 24 + 20 + 2.25))
    out = text(plan)
    assert "32% fewer training FLOPs" in out  # 1 - 45.25 / 66.25
    assert "36.2 TFLOP instead of 53 TFLOP" in out


def test_a_member_without_stages_shows_no_saved_column(tmp_path, digits_data):
    one = "competition: remote\nmembers: [{name: plain, arch: test_resnet, pretrained: false, size: 64}]\n"
    root = remote_project(tmp_path / "p", digits_data, ensemble=one)
    plan = plan_ensemble(Project(root), "remote/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=5),
                         build=refuse_build)
    out = text(plan)
    assert "FLOPs saved" not in out and "progressive resizing" not in out and "decoded copies" not in out


def test_decoded_disk_counts_a_shared_size_once(tmp_path, digits_data):
    root = remote_project(tmp_path / "p", digits_data)
    plan = plan_ensemble(Project(root), "remote/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=5),
                         build=refuse_build)
    # staged, frozen and plain decode at 32 and 64 (shared); jpeg (48) reads JPEGs: 1200 images of expected:
    assert [c.hw for c in plan.decoded] == [(32, 32), (64, 64)]
    assert plan.decoded[1].members == ["staged", "frozen", "plain"]
    assert decoded_bytes(1200, (64, 64)) == 1200 * 64 * 64 * 3
    assert [c.bytes for c in plan.decoded] == [1200 * 32 * 32 * 3, 1200 * 64 * 64 * 3]
    assert plan.decoded_total == 1200 * (32 * 32 + 64 * 64) * 3
    assert plan.decoded_ram == 1200 * 64 * 64 * 3  # the largest copy, read through the page cache
    out = text(plan)
    assert "decoded copies (decode: true) of the 1200 training and test images (by expected:)" in out
    assert "32x32 4 MiB, 64x64 14 MiB; 18 MiB on disk" in out and "up to 14 MiB of RAM" in out


def test_decoded_disk_with_the_data_counts_its_images(tmp_path, digits_data):
    body = STAGED.replace("competition: remote", "competition: digits")
    root = make_project(tmp_path / "p", digits_data, {"a": body})
    plan = plan_ensemble(Project(root), "digits/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=10),
                         build=refuse_build)
    assert plan.data_known and (plan.n_train + plan.n_valid, plan.n_test) == (1438, 359)
    assert plan.decoded_total == decoded_bytes(1438 + 359, (32, 32)) + decoded_bytes(1438 + 359, (64, 64))
    assert all(m.known and not m.cached for m in plan.members)
    assert "not known before the data" not in text(plan)


def paddy(name: str):
    return load_ensemble(Project(REPO), f"paddy/{name}.yaml")[1]


def test_paddy_final_trains_the_seed_members_in_stages_ending_at_the_seeds_sizes():
    seed, final = paddy("seed-final"), paddy("final")
    assert [(m.name, m.arch) for m in final.members] == [(m.name, m.arch) for m in seed.members]
    assert [m.size for m in seed.members] == [320, 299, 224, 244]  # the seed's table, exactly
    assert all(m.stages is None and m.epochs == 10 for m in seed.members)
    for s, f in zip(seed.members, final.members):
        assert len(f.stages) > 1 and f.final_size == s.size and f.total_epochs == s.epochs == 10, f.name
        smaller = sum(e for size, e in f.stages if size < s.size)
        assert smaller > f.total_epochs / 2, f.name  # most epochs at a smaller size
        assert f.decode and not s.decode
        assert f.model_dump(exclude={"stages", "size", "decode"}) == s.model_dump(exclude={"stages", "size", "decode"})


def test_a_cross_validated_plan_without_the_data_counts_fold_models_by_expected(tmp_path, digits_data):
    root = remote_project(tmp_path / "p", digits_data, competition=REMOTE + "cv: {folds: 4}\n",
                         ensemble=STAGED.replace("competition: remote", "competition: remote\nvalidation: cv"))
    plan = plan_ensemble(Project(root), "remote/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=5),
                         build=refuse_build)
    staged = plan.members[0]
    assert plan.folds == 4 and [(u.fold, u.n_train, u.n_valid) for u in staged.folds] == [(f, 750, 250) for f in range(4)]
    assert not any(u.known for u in staged.folds) and staged.train_images == 3000
    assert plan.decoded_total == decoded_bytes(1200, (32, 32)) + decoded_bytes(1200, (64, 64))  # shared by the folds
    out = text(plan)
    assert "≈750 train, ≈250 valid" in out and "unknown" in out and "to train" not in out.replace("to train them all", "")


def test_the_data_governs_and_a_wrong_expected_is_noted(tmp_path, digits_data):
    root = make_project(tmp_path / "p", digits_data, {"a": STAGED.replace("competition: remote", "competition: digits")})
    with open(root / "competitions" / "digits.yaml", "a") as f:
        f.write("expected: {classes: 10, train_images: 1500, test_images: 359}\n")
    plan = plan_ensemble(Project(root), "digits/a", device="cpu", memo=write_memo(tmp_path / "m.json", classes=10),
                         build=refuse_build)
    assert plan.n_train + plan.n_valid == 1438 and plan.counts_from == "data"
    assert [n for n in plan.notes if not n.startswith("pretrained weights")] == [  # (its weights: test_weights.py)
        "competitions/digits.yaml expected: says train_images 1500 (the data has 1438); the data governs"]
    assert "note: competitions/digits.yaml expected: says train_images 1500" in text(plan)
