"""Config loading, overrides, cache keys and the one-line errors for bad input (exit code 2, no traceback)."""

import inspect
from pathlib import Path

import pytest

from conftest import ens, make_project
from pipelines.cache import member_key
from pipelines.config import Member, Project, apply_overrides, load_ensemble
from pipelines.errors import ConfigError

BASE = """\
competition: digits
defaults: {pretrained: false, size: 16, epochs: 1, lr: 0.005}
members:
  - {name: a, arch: test_convnext}
  - {name: b, arch: test_vit, lr: 0.002}
"""


def test_defaults_merge_and_member_wins(project):
    (project / "ensembles/digits/base.yaml").write_text(BASE)
    _, ens_, comp = load_ensemble(Project(project), "digits/base.yaml")
    a, b = ens_.members
    assert (a.lr, b.lr) == (0.005, 0.002)
    assert a.size == b.size == 16 and comp.name == "digits" and comp.metric == "accuracy"


def test_overrides_defaults_and_one_member(project):
    (project / "ensembles/digits/base.yaml").write_text(BASE)
    _, e, _ = load_ensemble(Project(project), "digits/base.yaml",
                            ["defaults.epochs=3", "members.b.lr=0.1", "members.a.tta.n=0", "members.1.size=[24, 32]"])
    a, b = e.members
    assert (a.epochs, b.epochs, a.lr, b.lr, a.tta.n, b.size) == (3, 3, 0.005, 0.1, 0, (24, 32))


def test_override_of_every_member_beats_their_own_values(project):
    (project / "ensembles/digits/base.yaml").write_text(BASE)
    _, e, _ = load_ensemble(Project(project), "digits/base.yaml", ["members.*.lr=0.3", "members.*.size=8"])
    assert [(m.lr, m.size) for m in e.members] == [(0.3, 8), (0.3, 8)]


def test_override_of_unknown_member_names_the_members():
    with pytest.raises(ConfigError, match="no member named 'zz'; members: a, b"):
        apply_overrides({"members": [{"name": "a"}, {"name": "b"}]}, ["members.zz.lr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["epochs"])


def test_plain_path_and_name_resolve(project):
    path = project / "elsewhere.yaml"
    path.write_text(BASE)
    assert load_ensemble(Project(project), str(path))[0] == path.resolve()
    assert load_ensemble(Project(project), "digits/tiny")[1].members[0].name == "convnext"


def test_aug_transforms_fields_are_fastais_own():
    from fastai.vision.augment import aug_transforms

    from pipelines.config import AugTransforms

    params = inspect.signature(aug_transforms).parameters
    ours = AugTransforms()
    for name, field in AugTransforms.model_fields.items():
        assert name in params, name
        default = params[name].default
        assert str(getattr(ours, name)) == str(default).split(".")[-1].lower() or getattr(ours, name) == default, name
    assert set(params) - set(AugTransforms.model_fields) == {"xtra_tfms", "size"}  # set by ens itself


def _key(**changes):
    fields = dict(name="a", arch="test_convnext", pretrained=False, size=16, epochs=1, lr=0.005) | changes
    return member_key(Member(**fields), "data-fingerprint")


def test_key_ignores_name_weight_workers_but_not_what_changes_predictions(tmp_path):
    base = _key()
    assert _key(name="renamed", weight=3.0, num_workers=4, keep_model=True) == base
    for change in (dict(lr=0.01), dict(size=24), dict(epochs=2), dict(seed=1), dict(arch="test_vit"),
                   dict(tta={"n": 2}), dict(aug_transforms={"max_rotate": 5}), dict(aug_transforms=None)):
        assert _key(**change) != base, change
    assert member_key(Member(name="a", arch="test_convnext", pretrained=False, size=16, epochs=1, lr=0.005),
                      "other data") != base
    # stages spelled out as one stage equal the plain size/epochs
    assert _key(stages=[[16, 1]]) == base
    # a weights file counts by content, not by where it lies
    w1, w2 = tmp_path / "w1.pth", tmp_path / "sub" / "w2.pth"
    w2.parent.mkdir()
    w1.write_bytes(b"weights")
    w2.write_bytes(b"weights")
    assert _key(pretrained=str(w1)) == _key(pretrained=str(w2))
    w2.write_bytes(b"other weights")
    assert _key(pretrained=str(w1)) != _key(pretrained=str(w2))


# --------------------------------------------------------------------------------------------- bad input
BAD = {
    "unknown key": (BASE.replace("lr: 0.002", "lrr: 0.002"), "members[1].lrr: unknown key; did you mean 'lr'?"),
    "unknown key in defaults": (BASE.replace("epochs: 1", "epoch: 1"), "defaults.epoch: unknown key; did you mean 'epochs'?"),
    "unknown aug_transforms key": (BASE.replace("lr: 0.005}", "lr: 0.005, aug_transforms: {max_rotat: 3}}"),
                                   "defaults.aug_transforms.max_rotat: unknown key; did you mean 'max_rotate'?"),
    "wrong type": (BASE.replace("lr: 0.002", "lr: fast"), "members[1].lr: Input should be a valid number"),
    "duplicate member": (BASE.replace("name: b", "name: a"), "member name 'a' is used twice"),
    "unknown competition": (BASE.replace("competition: digits", "competition: digitz"),
                            "no such competition 'digitz'; known: digits"),
    "unknown architecture": (BASE.replace("test_vit", "convnext_smal_in22k"),
                             "members[1].arch: unknown timm architecture 'convnext_smal_in22k'; did you mean convnext_small_in22k"),
    "not YAML": (BASE + "  - {name: c, arch: [\n", "not valid YAML"),
    "missing arch": (BASE.replace(", arch: test_vit", ""), "members[1].arch: required"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(project, case):
    text, expected = BAD[case]
    (project / "ensembles/digits/bad.yaml").write_text(text)
    result = ens("validate", "digits/bad.yaml", cwd=project)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ensembles/digits/bad.yaml" in lines[0] or "digitz" in lines[0]
    assert expected in lines[0], lines[0]


def test_bad_override_and_missing_data_folder_and_no_project(project, tmp_path):
    result = ens("validate", "digits/tiny.yaml", "members.nobody.lr=1", cwd=project)
    assert result.returncode == 2 and "no member named 'nobody'" in result.stderr and "Traceback" not in result.stderr
    comp = project / "competitions/digits.yaml"
    comp.write_text(comp.read_text().replace("builtin: digits", "").rsplit("data_dir", 1)[0] + "data_dir: nowhere\n")
    result = ens("run", "digits/tiny.yaml", cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data folder nowhere is missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = ens("validate", "digits/tiny.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "not inside an ens project" in result.stderr


def test_project_found_from_a_subfolder_and_from_env(project, tmp_path):
    sub = project / "ensembles" / "digits"
    assert ens("validate", "digits/tiny.yaml", cwd=sub).returncode == 0
    assert ens("validate", "digits/tiny.yaml", "--project", str(project), cwd=tmp_path).returncode == 0
