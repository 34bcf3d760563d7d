"""`ens tune`: an Optuna search over a member's `tune.space`, trials trained for real on a fraction of digits."""

import pytest

from conftest import make_project
from pipelines.cache import MemberCache, member_key
from pipelines.config import Project, TuneRange, load_ensemble
from pipelines.errors import ConfigError

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

SEARCH = """\
competition: digits
defaults:
  pretrained: false
  size: 32
  epochs: 8
  lr: 0.005
  batch_size: 64
  num_workers: 0
  tta: {n: 1}
  tune:
    trials: 3
    epochs: 2
    fraction: 0.25
    pruner: none
    space:
      lr: {low: 5.0e-3, high: 5.0e-2, log: true}
      batch_size: [32, 64]
      aug_transforms.max_rotate: {low: 0, high: 30}
      aug_transforms.max_lighting: {low: 0.0, high: 0.4}
members:
  - {name: effnet, arch: test_efficientnet}
  - {name: other, arch: test_resnet}
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits_data):
    """A 3-trial search of `effnet` (2 epochs a trial, 25 % of the training images): (project, TuneResult)."""
    from pipelines.tune import tune_member

    root = make_project(tmp_path_factory.mktemp("tune") / "project", digits_data, {"search": SEARCH})
    return root, tune_member(Project(root), "digits/search.yaml", "effnet")


def test_search_runs_its_trials_in_the_declared_space(searched):
    root, r = searched
    assert (r.ran, r.target, len(r.trials)) == (3, 3, 3)
    assert all(t.state == "complete" and t.epochs == 2 for t in r.trials)
    space = r.tune.space
    for t in r.trials:
        assert set(t.params) == set(space)
        assert space["lr"].low <= t.params["lr"] <= space["lr"].high
        assert t.params["batch_size"] in (32, 64)
        rot = t.params["aug_transforms.max_rotate"]
        assert isinstance(rot, int) and 0 <= rot <= 30  # integer bounds: an integer range
        assert 0.0 <= t.params["aug_transforms.max_lighting"] <= 0.4
        assert 0.1 < t.value <= 1  # a validation accuracy, better than chance on ten classes
    assert len({t.params["lr"] for t in r.trials}) == 3
    assert r.best.value == max(t.value for t in r.trials)
    # 25 % of the training images (stratified), every validation image of the competition's split
    assert (r.n_train, r.n_valid) == (288, 286)
    # trials leave no cache entry, only the study
    assert MemberCache(root / "cache", "digits").entries() == []
    assert r.storage == root / "cache/digits/.tune/search-effnet.db" and r.storage.is_file()


def test_best_value_is_the_accuracy_of_retraining_the_member(searched, digits_data):
    from pipelines.data import load_data, train_fraction
    from pipelines.train import train_member
    from pipelines.tune import trial_member

    root, r = searched
    best = r.best
    member = trial_member(r.member, r.tune, best.params)
    assert (member.lr, member.batch_size, member.epochs) == (best.params["lr"], best.params["batch_size"], 2)
    assert member.aug_transforms.max_rotate == best.params["aug_transforms.max_rotate"]
    data = train_fraction(load_data(Project(root), r.competition), r.tune.fraction, r.member.seed)
    trained = train_member(member, data)
    assert trained.history[-1]["accuracy"] == pytest.approx(best.value, abs=1e-6)


def test_more_trials_resume_the_study_and_run_only_the_new_ones(searched):
    from pipelines.tune import tune_member

    root, r = searched
    seen = []
    again = tune_member(Project(root), "digits/search.yaml", "effnet", n_trials=4, on_trial=seen.append)
    assert (again.ran, len(again.trials), len(seen)) == (1, 4, 1)
    assert again.study_name == r.study_name
    assert [t.params for t in again.trials[:3]] == [t.params for t in r.trials]  # the first three, not redone
    assert seen[0].number == 3 and seen[0].params not in [t.params for t in r.trials]
    # asking for what is done already runs nothing
    assert tune_member(Project(root), "digits/search.yaml", "effnet", n_trials=2).ran == 0


def test_write_best_sets_the_members_fields(searched, tmp_path):
    from pipelines.tune import write_best

    root, r = searched
    dest = write_best(r, root / "ensembles/digits/tuned.yaml")
    assert dest.read_text().startswith("# written by `ens tune` from search.yaml: member effnet has trial")
    _, ens, _ = load_ensemble(Project(root), "digits/tuned.yaml")
    effnet, other = ens.members
    best = r.best.params
    assert (effnet.lr, effnet.batch_size) == (best["lr"], best["batch_size"])
    assert effnet.aug_transforms.max_rotate == best["aug_transforms.max_rotate"]
    assert effnet.aug_transforms.max_lighting == best["aug_transforms.max_lighting"]
    assert effnet.epochs == 8 and effnet.aug_transforms.max_zoom == 1.1  # the rest as it was
    assert (other.lr, other.batch_size) == (0.005, 64)


def test_render_marks_the_best(searched):
    from rich.console import Console

    from pipelines.tune import render

    _, r = searched
    console = Console(record=True, width=200)
    render(r, console)
    text = console.export_text()
    assert f"★ {r.best.number}" in text and "valid accuracy" in text and "aug_transforms.max_rotate" in text
    assert f"best: trial {r.best.number}, valid accuracy {r.best.value:.4f}" in text


def test_a_pruner_that_says_prune_stops_trials_after_their_first_epoch(tmp_path, digits_data):
    import optuna

    from pipelines.tune import tune_member

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    root = make_project(tmp_path / "project", digits_data, {"search": SEARCH})
    rows = []
    overrides = ["defaults.tune.space={lr: [0.02]}", "defaults.tune.fraction=0.1"]
    r = tune_member(Project(root), "digits/search.yaml", "effnet", overrides, n_trials=2, pruner=AlwaysPrune(),
                    on_trial=rows.append)
    assert [(t.state, t.epochs) for t in r.trials] == [("pruned", 1), ("pruned", 1)] and len(rows) == 2
    assert all(0 <= t.value <= 1 for t in r.trials)  # the score reported after the first epoch
    assert r.best is None


def test_a_space_key_that_is_not_a_member_field_is_a_one_line_error(project):
    bad = SEARCH.replace("aug_transforms.max_rotate:", "aug_transforms.max_rotat:")
    (project / "ensembles/digits/bad.yaml").write_text(bad)
    with pytest.raises(ConfigError) as e:
        load_ensemble(Project(project), "digits/bad.yaml")
    assert str(e.value).startswith("ensembles/digits/bad.yaml: defaults.tune: space key 'aug_transforms.max_rotat' "
                                   "is not a member field; did you mean 'aug_transforms.max_rotate'?")
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("space, message", [
    ("{lr: {low: 0.1, high: 0.01}}", "space key 'lr': low 0.1 must be below high 0.01"),
    ("{lr: {low: 0, high: 1, log: true}}", "space key 'lr': a log range needs low > 0"),
    ("{lr: {low: 0.1, high: 1, lg: true}}", "space key 'lr': unknown key 'lg'"),
    ("{lr: 3}", "space key 'lr': give a list of choices or a range"),
    ("{batch_size: {low: 16.0, high: 64}}", "space key 'batch_size' takes integers"),
    ("{batch_size: [0, 64]}", "space key 'batch_size': 0 is not a value of that field"),
    ("{epochs: [1, 2]}", "space key 'epochs' cannot be tuned"),
    ("{resize.method: [squish, stretch]}", "space key 'resize.method': 'stretch' is not a value"),
])
def test_bad_spaces_are_one_line_errors(project, space, message):
    (project / "ensembles/digits/bad.yaml").write_text(SEARCH)
    with pytest.raises(ConfigError, match=message) as e:
        load_ensemble(Project(project), "digits/bad.yaml", [f"defaults.tune.space={space}"])
    assert "\n" not in str(e.value) and "defaults.tune" in str(e.value)


def test_a_member_without_tune_or_an_unknown_member_is_named(project):
    from pipelines.tune import tune_member

    with pytest.raises(ConfigError, match="member 'effnet' has no tune: section"):
        tune_member(Project(project), "digits/tiny.yaml", "effnet")
    with pytest.raises(ConfigError, match="no member named 'nope'; members: convnext, effnet, resnet"):
        tune_member(Project(project), "digits/tiny.yaml", "nope")


def test_tune_does_not_change_the_cache_key(project):
    (project / "ensembles/digits/search.yaml").write_text(SEARCH)
    _, tuned, _ = load_ensemble(Project(project), "digits/search.yaml")
    _, plain, _ = load_ensemble(Project(project), "digits/search.yaml", ["defaults.tune=null"])
    assert tuned.members[0].tune is not None and plain.members[0].tune is None
    assert member_key(tuned.members[0], "fp") == member_key(plain.members[0], "fp")


def test_trial_member_and_ranges():
    from pipelines.config import Member, Tune
    from pipelines.tune import InvalidTrial, trial_member

    tune = Tune(epochs=3, space={"size": [[16, 24], 32], "lr": {"low": 1e-3, "high": 1e-2}})
    assert isinstance(tune.space["lr"], TuneRange) and not tune.space["lr"].is_int
    m = Member(name="m", arch="test_resnet", stages=[[16, 2], [32, 6]], prepare={"max_size": 32}, tune=tune)
    t = trial_member(m, tune, {"size": [16, 24], "lr": 0.004})
    assert (t.epochs, t.stages, t.size, t.lr, t.tune) == (3, None, (16, 24), 0.004, None)
    assert trial_member(m, tune, {}).size == 32  # the member's final stage size
    with pytest.raises(InvalidTrial, match="prepare.max_size 32 is below the size 64"):
        trial_member(m, tune, {"size": 64})


def test_train_fraction_is_stratified_and_keeps_the_validation_images(project):
    from collections import Counter

    from pipelines.config import load_competition
    from pipelines.data import load_data, train_fraction

    data = load_data(Project(project), load_competition(Project(project), "digits"))
    part = train_fraction(data, 0.25, seed=42)
    assert part.valid_paths == data.valid_paths and part.vocab == data.vocab
    full = Counter(l for l, v in zip(data.train_labels, data.is_valid) if not v)
    kept = Counter(l for l, v in zip(part.train_labels, part.is_valid) if not v)
    assert all(kept[c] == round(full[c] * 0.25) for c in full)
    assert train_fraction(data, 0.25, seed=42) == part and train_fraction(data, 0.25, seed=7) != part
    assert part.fingerprint != data.fingerprint and train_fraction(data, 1.0) is data
