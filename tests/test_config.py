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
    # the parser's own messages span lines (a context block, then the problem; or 'in "<unicode string>"')
    "not YAML, two marks": (BASE + "  - {name: c, arch: [x, y\nother: 3\n", "line 7: not valid YAML"),
    "control character": (BASE + "  - {name: c, arch: \x07}\n", "line 6: not valid YAML"),
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


# values `ens run` would only find out about mid-training (PIL, torch or fastai raising a traceback)
OUT_OF_RANGE = {
    "defaults.size=-1": "defaults.size: a size is a positive number of pixels",
    "defaults.size=0": "defaults.size: a size is a positive number of pixels",
    "defaults.size=[32, 0]": "defaults.size: a size is a positive number of pixels",
    "defaults.size=true": "defaults.size: a size is",
    "defaults.size=[32]": "defaults.size: a size is",
    "members.a.stages=[[16, 1], [-8, 1]]": "members[0].stages[1][0]: a size is a positive number of pixels",
    "members.a.resize.size=0": "members[0].resize.size: a size is a positive number of pixels",
    "defaults.aug_transforms.max_warp=1": "defaults.aug_transforms.max_warp",
    "defaults.aug_transforms.max_warp=-0.1": "defaults.aug_transforms.max_warp",
    "defaults.aug_transforms.max_lighting=1.5": "defaults.aug_transforms.max_lighting",
    "defaults.aug_transforms.max_zoom=0.9": "defaults.aug_transforms.max_zoom",
    "defaults.aug_transforms.min_zoom=0": "defaults.aug_transforms.min_zoom",
    "defaults.aug_transforms.min_zoom=1.5": "min_zoom 1.5 is above max_zoom 1.1",
    "defaults.aug_transforms.min_scale=0": "defaults.aug_transforms.min_scale",
    "defaults.aug_transforms.min_scale=1.5": "defaults.aug_transforms.min_scale",
    "defaults.aug_transforms.p_affine=1.5": "defaults.aug_transforms.p_affine",
    "defaults.aug_transforms.p_lighting=-0.1": "defaults.aug_transforms.p_lighting",
    "defaults.aug_transforms.max_rotate=-5": "defaults.aug_transforms.max_rotate",
    "defaults.aug_transforms.mult=-1": "defaults.aug_transforms.mult",
    "members.b.aug_transforms={max_lighting: 0.6, mult: 2}": "max_lighting × mult",
    "defaults.tta.n=-1": "defaults.tta.n",
    "defaults.tta.beta=2": "defaults.tta.beta",
    "defaults.prepare.max_size=4": "defaults.prepare.max_size",
}


@pytest.mark.parametrize("override", list(OUT_OF_RANGE))
def test_out_of_range_values_are_config_errors(project, override):
    (project / "ensembles/digits/base.yaml").write_text(BASE)
    with pytest.raises(ConfigError) as e:
        load_ensemble(Project(project), "digits/base.yaml", [override])
    message = str(e.value)
    key = override.partition("=")[0]
    # blamed on the command line, naming the override as typed (its key not said twice)
    expected = OUT_OF_RANGE[override]
    expected = expected.removeprefix(f"{key}: ").removeprefix(key.replace("members.a", "members[0]") + ": ")
    assert expected in message and "\n" not in message, message
    assert message.startswith(f"command line: {override}: "), message


def test_values_in_range_still_load(project):
    (project / "ensembles/digits/base.yaml").write_text(BASE)
    _, e, _ = load_ensemble(Project(project), "digits/base.yaml", [
        "defaults.size=[24, 32]", "members.a.stages=[[16, 1], [[24, 32], 2]]", "members.b.resize.size=40",
        "defaults.aug_transforms={min_zoom: 0.8, max_zoom: 1.2, max_warp: 0, max_lighting: 0.4, mult: 2, "
        "min_scale: 0.35, p_affine: 1, p_lighting: 0, max_rotate: 180}", "defaults.tta={n: 0}"])
    a, b = e.members
    assert a.stage_plan == [(16, 1), ((24, 32), 2)] and b.resize.size == 40 and b.size == (24, 32)
    assert a.aug_transforms.min_zoom == 0.8 and a.tta.n == 0


STAGED = """\
competition: digits
defaults: {pretrained: false, size: 16, epochs: 1}
members:
  - {name: a, arch: test_convnext, stages: [[16, 2], [24, 1]]}
  - {name: b, arch: test_vit}
"""


def _error(project, overrides=(), text=STAGED) -> str:
    (project / "ensembles/digits/staged.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_ensemble(Project(project), "digits/staged.yaml", list(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_an_override_the_member_ignores_is_an_error_naming_what_governs(project):
    # a smoke test's epochs=1 on a member with stages would train the full run
    assert _error(project, ["members.a.epochs=3"]) == (
        "command line: members.a.epochs=3: ignored: stages [[16, 2], [24, 1]] govern a's epochs; change stages "
        "instead, e.g. members.a.stages=[[16,1]]")
    assert "members.*.size=8: ignored: stages [[16, 2], [24, 1]] govern a's sizes" in _error(project, ["members.*.size=8"])
    all_staged = STAGED.replace("{name: b, arch: test_vit}", "{name: b, arch: test_vit, stages: [[16, 1]]}")
    message = _error(project, ["defaults.epochs=1"], all_staged)
    assert message.startswith("command line: defaults.epochs=1: ignored by every member: stages"), message
    assert "members.a.stages=[[16,1]]" in message
    message = _error(project, ["members.*.epochs=1"], all_staged)
    assert "(and alike for 1 more members)" in message and message.count("ignored") == 1, message
    # a defaults value some members take: loads, with a warning naming those that do not
    from pipelines.run import config_warnings

    (project / "ensembles/digits/staged.yaml").write_text(STAGED)
    _, e, _ = load_ensemble(Project(project), "digits/staged.yaml", ["defaults.epochs=3"])
    assert e.members[1].epochs == 3
    assert config_warnings(e, ["defaults.epochs=3"]) == [
        "defaults.epochs is ignored by a: stages [[16, 2], [24, 1]] govern a's epochs; change stages instead, "
        "e.g. members.a.stages=[[16,1]]"]
    assert config_warnings(e, []) == []  # the YAML's defaults, used by b: nothing to say
    result = ens("validate", "digits/staged.yaml", "members.a.epochs=3", cwd=project)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    result = ens("validate", "digits/staged.yaml", "defaults.epochs=3", cwd=project)
    assert result.returncode == 0 and "warning: defaults.epochs is ignored by a: stages" in result.stderr


IGNORED = {  # a member field the member does not use: what the error says
    "members.a.epochs=4": "members[0].epochs: ignored: stages [[16, 2], [24, 1]] govern a's epochs",
    "members.b.resize={size: 20}": "members[1].resize.size: ignored: without aug_transforms each image is resized "
                                   "straight to the stage size",
    "members.b.freeze_epochs=2": "members[1].freeze_epochs: ignored: a body trained from scratch (pretrained: false)",
    "members.b.tta={n: 0, beta: 0.5}": "members[1].tta.beta: ignored: no augmented TTA passes",
}


@pytest.mark.parametrize("field", list(IGNORED))
def test_a_yaml_field_the_member_ignores_is_an_error_in_the_file(project, field):
    key, _, value = field.partition("=")
    name, attr = key.split(".")[1:3]
    text = STAGED.replace(f"{{name: {name}, arch: test_", f"{{name: {name}, {attr}: {value}, arch: test_")
    if attr == "resize":
        text = text.replace("{name: b, ", "{name: b, aug_transforms: null, ")
    message = _error(project, (), text)
    assert message.startswith(f"ensembles/digits/staged.yaml: {IGNORED[field]}"), message


def test_every_problem_of_a_file_at_once_the_bad_arch_included(project):
    from pipelines.run import check_ensemble

    bad = BASE.replace("lr: 0.002", "lrr: 0.002").replace("epochs: 1", "epochs: many").replace("test_convnext",
                                                                                               "test_convnex")
    (project / "ensembles/digits/bad.yaml").write_text(bad)
    with pytest.raises(ConfigError) as e:
        check_ensemble(Project(project), "digits/bad.yaml", [])
    assert str(e.value) == (
        "ensembles/digits/bad.yaml: 3 problems: (1) defaults.epochs: Input should be a valid integer, unable to "
        "parse string as an integer (got 'many'); (2) members[1].lrr: unknown key; did you mean 'lr'?; "
        "(3) members[0].arch: unknown timm architecture 'test_convnex'; did you mean test_convnext, "
        "test_convnext3, test_convnext2?"), str(e.value)


def test_an_override_error_is_blamed_on_the_command_line(project):
    result = ens("validate", "digits/tiny.yaml", "default.epochs=1", cwd=project)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: command line: default.epochs=1: unknown key 'default'; did you mean "
                                     "'defaults'?"), result.stderr
    message = _error(project, ["members.a.size=0", "defaults.epoch=2"], BASE.replace("lr: 0.002", "lrr: 0.002"))
    assert message == ("command line: 2 problems: (1) members.a.size=0: a size is a positive number of pixels, an "
                       "int or [height, width] of ints (e.g. 224 or [224, 288]); fix the value (got 0); "
                       "(2) defaults.epoch=2: unknown key 'epoch'; did you mean 'epochs'?; "
                       "ensembles/digits/staged.yaml: members[1].lrr: unknown key; did you mean 'lr'?"), message


def test_size_out_of_range_from_the_command_line(project):
    result = ens("validate", "digits/tiny.yaml", "defaults.size=-1", cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: command line: defaults.size=-1: a size is a positive" in lines[0], lines


def test_missing_weights_file_is_a_config_error(project, tmp_path, monkeypatch):
    (project / "ensembles/digits/base.yaml").write_text(BASE)
    monkeypatch.chdir(project)
    for override, where in (("defaults.pretrained=weights/nope.pth", "defaults.pretrained"),
                            ("members.b.pretrained=weights/nope.pth", "members[1].pretrained"),
                            ("members.b.pretrained=weights", "members[1].pretrained")):
        (project / "weights").mkdir(exist_ok=True)
        with pytest.raises(ConfigError) as e:
            load_ensemble(Project(project), "digits/base.yaml", [override])
        message = str(e.value)
        assert f"command line: {override}: weights file" in message and "\n" not in message, message
        assert "true or false" in message, message
    # existing files load: relative to the current folder, or under ~
    (project / "weights" / "w.pth").write_bytes(b"weights")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "home.pth").write_bytes(b"weights")
    _, e, _ = load_ensemble(Project(project), "digits/base.yaml",
                            ["members.a.pretrained=weights/w.pth", "members.b.pretrained=~/home.pth"])
    assert [m.pretrained for m in e.members] == ["weights/w.pth", "~/home.pth"]
    # a cache entry's member is read back without the file (ens eval on a kept model whose weights file moved)
    assert Member.model_validate(dict(name="a", arch="test_vit", pretrained="gone.pth")).pretrained == "gone.pth"
    result = ens("validate", "digits/base.yaml", "defaults.pretrained=weights/nope.pth", cwd=project)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "defaults.pretrained=weights/nope.pth: weights file" in result.stderr


def test_yaml_that_is_not_utf8_is_one_line(project):
    (project / "ensembles/digits/bad.yaml").write_bytes(BASE.encode() + b"  - {name: caf\xe9, arch: test_vit}\n")
    with pytest.raises(ConfigError) as e:
        load_ensemble(Project(project), "digits/bad.yaml")
    assert "\n" not in str(e.value) and "UTF-8" in str(e.value), str(e.value)


def test_every_ens_error_is_one_line():
    from pipelines.errors import EnsError

    for cls in (EnsError, ConfigError):
        error = cls("first line\n  in 'x', line 2:\n\tsecond   part ")
        assert str(error) == "first line in 'x', line 2: second part" and error.args == (str(error),)
    assert ConfigError("x").exit_code == 2 and EnsError("x").exit_code == 1


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


@pytest.mark.parametrize("override", ["defaults.size=[32", "defaults.aug_transforms={a: 1", "defaults.tta=@x"])
def test_an_override_value_that_is_not_yaml_is_one_line_blamed_on_the_command_line(project, override):
    out = ens("validate", "digits/tiny.yaml", override, cwd=project)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: command line: '{override}': the value is not YAML") and \
        len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_default_on_the_command_line_that_every_members_own_value_beats_is_an_error(tmp_path, digits_data):
    """The README's smoke test `defaults.epochs=1` on `ens init`'s starter (its member says `epochs: 5`) trained the
    full run (a new user found): an error naming the override that does reach the members."""
    root = make_project(tmp_path / "p", digits_data, {"s": "competition: digits\ndefaults: {pretrained: false}\n"
                                                          "members:\n  - {name: a, arch: test_resnet, epochs: 5}\n"})
    out = ens("validate", "digits/s.yaml", "defaults.epochs=1", cwd=root)
    assert out.returncode == 2 and "every member sets epochs itself" in out.stderr, out.stderr
    assert "use members.*.epochs=1 instead" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert ens("validate", "digits/s.yaml", "members.*.epochs=1", cwd=root).returncode == 0
