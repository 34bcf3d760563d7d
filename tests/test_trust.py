"""The correctness review (issue 12): no silent wrong result from a resume, fine-tuning that really unfreezes,
the stage size governing without augmentation, a cache key split into training and prediction, canonical keys,
no race between two runs of the same member, a full disk that damages nothing, and a resume that says so.

Interruptions are made in-process, exactly where the review found them (inside prediction, inside the cache
write, after a given epoch): a KeyboardInterrupt is what Ctrl-C raises."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_project
from pipelines import cache as cache_module
from pipelines import predict as predict_module
from pipelines import train as train_module
from pipelines.cache import MemberCache, member_key, train_key
from pipelines.config import Member, Project, load_ensemble
from pipelines.errors import EnsError
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow

ONE = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 2, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 1},
           aug_transforms: {do_flip: false}}
members:
  - {name: resnet, arch: test_resnet}
"""


def _project(tmp_path, digits_data, text=ONE, name="p"):
    return Project(make_project(tmp_path / name, digits_data, {"one": text}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_data):
    """The one-member ensemble trained without interruption: its probabilities are what every resume must give."""
    proj = Project(make_project(tmp_path_factory.mktemp("ref") / "p", digits_data, {"one": ONE}))
    return run_ensemble(proj, "digits/one.yaml", submit=False).members[0].entry


def _same_probs(a, b):
    for name in ("valid_plain", "valid_tta", "test_plain", "test_tta"):
        np.testing.assert_allclose(a.arrays[name], b.arrays[name], atol=1e-6, err_msg=name)


def _interrupt_once(monkeypatch, module, name):
    """Make `module.name` raise KeyboardInterrupt (Ctrl-C) on its first call, and behave on later calls."""
    original = getattr(module, name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return calls


# --------------------------------------------------------------------------------------------- item 1 (and 20, 25)
@pytest.mark.parametrize("keep_model", [False, True])
def test_stopped_during_prediction_the_rerun_predicts_with_the_trained_weights(reference, tmp_path, digits_data,
                                                                               monkeypatch, keep_model):
    """Ctrl-C during TTA, after the last epoch's checkpoint: the rerun must not predict with fresh weights."""
    text = ONE.replace("num_workers: 0", f"num_workers: 0, keep_model: {str(keep_model).lower()}")
    proj = _project(tmp_path, digits_data, text)
    _interrupt_once(monkeypatch, predict_module, "predict_member")
    with pytest.raises(KeyboardInterrupt):
        run_ensemble(proj, "digits/one.yaml", submit=False)
    rerun = run_ensemble(proj, "digits/one.yaml", submit=False).members[0]
    assert rerun.how == ("predicted" if keep_model else "resumed")
    assert not list((proj.cache / "digits").glob(".partial-*"))  # its checkpoints have served (issue 24 item 20)
    _same_probs(rerun.entry, reference)
    assert rerun.entry.meta["metrics"]["plain_accuracy"] == pytest.approx(reference.meta["metrics"]["plain_accuracy"])


def test_a_full_disk_while_writing_the_entry_damages_nothing_and_the_rerun_resumes(reference, tmp_path, digits_data,
                                                                                  monkeypatch, capsys):
    proj = _project(tmp_path, digits_data, ONE.replace("num_workers: 0", "num_workers: 0, keep_model: false"))
    original = np.savez
    calls = []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            original(*args, **kwargs)  # half written...
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module.np, "savez", full)
    with pytest.raises(EnsError) as e:
        run_ensemble(proj, "digits/one.yaml", submit=False)
    assert "disk is full" in str(e.value) and "cache/digits" in str(e.value) and "\n" not in str(e.value)
    root = proj.cache / "digits"
    assert not list(root.glob(".tmp-*")) and not [p for p in root.iterdir() if not p.name.startswith(".")]
    rerun = run_ensemble(proj, "digits/one.yaml", submit=False).members[0]
    assert rerun.how == "resumed" and rerun.entry.meta["resumed_at"] == "after its last epoch"
    assert "resuming an interrupted run at after its last epoch" in capsys.readouterr().err
    _same_probs(rerun.entry, reference)


def test_a_full_disk_while_checkpointing_stops_cleanly_keeping_the_last_checkpoint(tmp_path, digits_data, small_disk):
    """On a real full disk (a tmpfs as the cache), where torch.save given a path would raise a RuntimeError ("enforce
    fail at inline_container.cc") that no disk-full handler catches, and leave its temporary file."""
    import torch

    # keep_model: false, so that the second (last) epoch is checkpointed too: with kept weights it is not
    proj = _project(tmp_path, digits_data, ONE.replace("num_workers: 0", "num_workers: 0, keep_model: false"))
    # a checkpoint (weights, Adam's moments, RNGs) takes 5.8 MB: the first fits, the second beside it does not
    small_disk(proj.cache, "9m")
    with pytest.raises(EnsError) as e:
        run_ensemble(proj, "digits/one.yaml", submit=False)
    assert "disk is full" in str(e.value) and "the checkpoint of resnet" in str(e.value) and "\n" not in str(e.value)
    partial = next((proj.cache / "digits").glob(".partial-*"))
    assert [p.name for p in partial.iterdir()] == ["checkpoint.pth"]  # the first epoch's, whole: no temporary
    assert torch.load(partial / "checkpoint.pth", weights_only=False)["epochs_done"] == 1


class _StopAfter:
    """A fastai callback that presses Ctrl-C after the `n`th completed epoch (counted over every fit)."""

    def __new__(cls, n):
        from fastai.callback.core import Callback

        class StopAfter(Callback):
            order = 70  # after EpochLog has checkpointed the epoch

            def __init__(self):
                self.seen = 0

            def after_epoch(self):  # only ever joins a fit that starts at epoch 0
                self.seen += 1
                if self.seen == n:
                    raise KeyboardInterrupt

        return StopAfter()


def _stop_training_after(monkeypatch, n):
    from pipelines import train

    original = train.train_member
    stopper = _StopAfter(n)

    def wrapped(*args, **kwargs):
        if stopper.seen < n:
            kwargs["cbs"] = [*kwargs.get("cbs", ()), stopper]
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_member", wrapped)


# --------------------------------------------------------------------------------------------- item 4
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import timm
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "body.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    return path


def test_resume_at_the_frozen_to_unfrozen_boundary_is_exact(tmp_path, digits_data, weights, monkeypatch):
    """fastai's own `unfreeze` clears the optimizer's moments, so an uninterrupted fine_tune starts the unfrozen
    phase afresh too: the resume at the boundary reaches the uninterrupted result (1e-6)."""
    text = ONE.replace("pretrained: false", f"pretrained: {weights}, freeze_epochs: 1").replace("epochs: 2", "epochs: 2")
    whole = run_ensemble(_project(tmp_path, digits_data, text, "a"), "digits/one.yaml", submit=False).members[0]
    proj = _project(tmp_path, digits_data, text, "b")
    _stop_training_after(monkeypatch, 1)  # after the frozen epoch: its checkpoint says frozen, 1 epoch done
    with pytest.raises(KeyboardInterrupt):
        run_ensemble(proj, "digits/one.yaml", submit=False)
    resumed = run_ensemble(proj, "digits/one.yaml", submit=False).members[0]
    assert resumed.how == "resumed" and resumed.entry.meta["resumed_at"] == "train epoch 1 of 2"
    _same_probs(resumed.entry, whole.entry)


# --------------------------------------------------------------------------------------------- item 2
def test_freeze_epochs_zero_fine_tunes_the_whole_pretrained_body(tmp_path, digits_data, weights):
    import torch

    from pipelines.data import load_data
    from pipelines.train import train_member

    text = ONE.replace("pretrained: false", f"pretrained: {weights}, freeze_epochs: 0").replace("epochs: 2", "epochs: 1")
    proj = _project(tmp_path, digits_data, text)
    _, ens, comp = load_ensemble(proj, "digits/one.yaml")
    trained = train_member(ens.members[0], load_data(proj, comp))
    body = trained.learn.model[0].model.state_dict()
    before = torch.load(weights)
    convs = [k for k in body if k.endswith("conv1.weight") or k == "conv1.weight"]
    assert convs and all(not torch.equal(body[k], before[k]) for k in convs), "the body's convolutions did not train"
    assert all(p.requires_grad for p in trained.learn.model.parameters())


def test_fine_tune_phases_follow_fastai_for_any_freeze_epochs():
    from pipelines.train import _phases

    for freeze in (0, 1, 3):
        m = Member(name="m", arch="test_resnet", pretrained=True, lr=0.01, epochs=4, freeze_epochs=freeze)
        phases = _phases(m, None, [32] * 4, 32)
        train = phases[-1]
        assert [p.name for p in phases] == ["frozen"] * bool(freeze) + ["train"]
        assert train.fit_args["lr_max"] == slice(0.01 / 200, 0.01 / 2)
        assert train.fit_args["pct_start"] == 0.3 and train.fit_args["div"] == 5.0 and train.epochs == 4
    scratch = _phases(Member(name="m", arch="test_resnet", pretrained=False, lr=0.01, epochs=4), None, [32] * 4, 32)
    assert [p.name for p in scratch] == ["train"] and scratch[0].fit_args == {"lr_max": 0.01}


# --------------------------------------------------------------------------------------------- item 3
@pytest.mark.parametrize("augment", [False, True])
def test_the_stage_size_governs_the_batch_with_or_without_augmentation(tmp_path, digits_data, augment):
    from fastai.vision.all import set_seed

    from pipelines.data import dataloaders, load_data

    proj = _project(tmp_path, digits_data)
    _, ens, comp = load_ensemble(proj, "digits/one.yaml")
    aug = {"do_flip": False} if augment else None
    member = ens.members[0].model_copy(update={"resize": ens.members[0].resize.model_copy(update={"size": 48}),
                                               "aug_transforms": None if aug is None else ens.members[0].aug_transforms})
    data = load_data(proj, comp)
    for stage in (16, 40):
        set_seed(0)
        dls = dataloaders(data, member, stage)
        assert dls.one_batch()[0].shape[-2:] == (stage, stage)
        assert dls.valid.one_batch()[0].shape[-2:] == (stage, stage)


# --------------------------------------------------------------------------------------------- item 5
def test_a_tta_change_costs_prediction_only_and_another_beta_not_even_that(reference, tmp_path, digits_data,
                                                                          monkeypatch):
    proj = _project(tmp_path, digits_data)
    first = run_ensemble(proj, "digits/one.yaml", submit=False).members[0]
    _same_probs(first.entry, reference)

    def no_training(*args, **kwargs):
        raise AssertionError("a TTA change retrained the member")

    monkeypatch.setattr(train_module, "train_member", no_training)
    beta = run_ensemble(proj, "digits/one.yaml", ["defaults.tta.beta=0.6"], submit=False).members[0]
    assert beta.how == "derived" and beta.entry.key != first.entry.key
    aug, plain = first.entry.arrays["valid_aug"], first.entry.arrays["valid_plain"]
    np.testing.assert_allclose(beta.entry.arrays["valid_tta"], aug + 0.6 * (plain - aug), atol=1e-6)

    more = run_ensemble(proj, "digits/one.yaml", ["defaults.tta.n=2"], submit=False).members[0]
    assert more.how == "predicted" and more.entry.train_key == first.entry.train_key
    np.testing.assert_allclose(more.entry.arrays["valid_plain"], first.entry.arrays["valid_plain"], atol=1e-6)
    assert more.entry.meta["history"] == first.entry.meta["history"]  # the training is the same one
    assert more.entry.model_path == first.entry.model_path and more.entry.model_path.is_file()


def test_keep_model_false_keeps_no_weights(tmp_path, digits_data):
    proj = _project(tmp_path, digits_data, ONE.replace("epochs: 2", "epochs: 1").replace(
        "num_workers: 0", "num_workers: 0, keep_model: false"))
    entry = run_ensemble(proj, "digits/one.yaml", submit=False).members[0].entry
    assert entry.model_path is None and not (proj.cache / "digits" / "models").exists()


# --------------------------------------------------------------------------------------------- items 6, 7
def _key(**fields):
    base = dict(name="m", arch="test_resnet", pretrained=False, size=32, epochs=2, lr=0.01)
    return member_key(Member(**(base | fields)), "fp")


def test_equivalent_configs_share_one_key():
    assert _key(size=[32, 32]) == _key(size=32)
    assert _key(stages=[[[16, 16], 1], [32, 1]]) == _key(stages=[[16, 1], [32, 1]])
    assert _key(resize={"size": 32}) == _key()  # presizing to the size itself is no presizing
    assert _key(resize={"size": 48}, aug_transforms=None) == _key(aug_transforms=None)  # nothing brings it to 32
    assert _key(precision="fp32") == _key(precision="auto") == _key(precision="bf16")  # all fp32 on a CPU
    assert _key(freeze_epochs=3) == _key(freeze_epochs=0)  # no frozen phase from scratch
    assert _key(aug_transforms=None, tta={"n": 4}) == _key(aug_transforms=None, tta={"n": 0})  # identical passes
    assert _key(tta={"n": 0, "beta": 0.9}) == _key(tta={"n": 0, "beta": 0.1})
    # and what does change the result still changes the key
    assert len({_key(), _key(resize={"size": 48}), _key(size=[32, 24]), _key(freeze_epochs=3, pretrained=True),
                _key(tta={"n": 2}), _key(tta={"beta": 0.5}), _key(lr=0.02)}) == 7


def test_a_timm_alias_and_its_tag_share_a_key_and_pretrained_names_resolve_their_tag():
    alias = _key(arch="convnext_small_in22k", pretrained=True)
    assert alias == _key(arch="convnext_small.fb_in22k", pretrained=True)
    # `pretrained: true` on an untagged name means timm's default tag today: the key says which weights
    from pipelines.models import _memo

    default = _memo()["timm_default_tag"]["convnext_small"]
    assert _key(arch="convnext_small", pretrained=True) == _key(arch=f"convnext_small.{default}", pretrained=True)
    other = next(t for t in ("fb_in1k", "fb_in22k_ft_in1k") if t != default)
    assert _key(arch="convnext_small", pretrained=True) != _key(arch=f"convnext_small.{other}", pretrained=True)
    assert train_key(Member(name="m", arch="convnext_small", pretrained=True), "fp") != \
        train_key(Member(name="m", arch="convnext_small", pretrained=False), "fp")
    # torchvision: fastai loads torchvision's DEFAULT weights, which move between torchvision versions
    from pipelines.models import resolved_arch

    assert resolved_arch("torchvision:resnet50", True) == "torchvision:resnet50@ResNet50_Weights.IMAGENET1K_V2"
    assert resolved_arch("torchvision:resnet50", False) == "torchvision:resnet50"


def test_an_entry_made_with_other_library_versions_is_flagged(tmp_path, digits_data):
    from conftest import ens

    proj = _project(tmp_path, digits_data, ONE.replace("epochs: 2", "epochs: 1"))
    entry = run_ensemble(proj, "digits/one.yaml", submit=False).members[0].entry
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["versions"]["timm"] = "0.6.13"
    (entry.path / "meta.json").write_text(json.dumps(meta))
    out = ens("run", "digits/one.yaml", "--no-submit", cwd=proj.root)
    assert out.returncode == 0, out.stderr
    assert "resnet: cached with timm 0.6.13 →" in " ".join(out.stderr.split())


# --------------------------------------------------------------------------------------------- item 10
def test_two_runs_of_one_member_train_it_once(tmp_path, digits_data):
    """Two terminals, two ensembles sharing a member: the second waits for the first, then reads its entry."""
    other = ONE + "  - {name: effnet, arch: test_efficientnet, epochs: 1}\n"
    root = make_project(tmp_path / "p", digits_data, {"one": ONE, "two": other})
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", f"digits/{name}.yaml"], cwd=root,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("one", "two")]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [line for out, _ in outs for line in out.splitlines() if line.startswith("✓ resnet")]
    assert sorted("trained" in line for line in lines) == [False, True], lines  # once trained, once read
    assert "another ens run is computing it" in "".join(out + err for out, err in outs)
    assert len([p for p in (root / "cache/digits").iterdir() if not p.name.startswith(".") and p.name != "models"]) == 2


# --------------------------------------------------------------------------------------------- item 21
def test_tta_without_augmentation_is_skipped_with_a_warning(tmp_path, digits_data):
    from conftest import ens

    text = ONE.replace("aug_transforms: {do_flip: false}", "aug_transforms: null").replace("epochs: 2", "epochs: 1")
    proj = _project(tmp_path, digits_data, text.replace("tta: {n: 1}", "tta: {n: 3}"))
    out = ens("run", "digits/one.yaml", "--no-submit", cwd=proj.root)
    assert out.returncode == 0, out.stderr
    assert "tta.n 3 with aug_transforms: null would repeat the plain pass" in " ".join(out.stderr.split())
    entry = MemberCache(proj.cache, "digits").load(member_key(load_ensemble(proj, "digits/one.yaml")[1].members[0],
                                                              _fingerprint(proj)))
    np.testing.assert_array_equal(entry.arrays["valid_tta"], entry.arrays["valid_plain"])


def _fingerprint(proj):
    from pipelines.config import load_competition
    from pipelines.data import load_data

    return load_data(proj, load_competition(proj, "digits")).fingerprint


# --------------------------------------------------------------------------------------------- item 25
def test_a_resumed_member_says_where_it_resumed(tmp_path, digits_data, monkeypatch):
    from conftest import ens

    proj = _project(tmp_path, digits_data)
    _stop_training_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_ensemble(proj, "digits/one.yaml", submit=False)
    out = ens("run", "digits/one.yaml", "--no-submit", cwd=proj.root)
    assert out.returncode == 0, out.stderr
    text = " ".join((out.stdout + out.stderr).split())
    assert "resnet (test_resnet): resuming an interrupted run at train epoch 2 of 2" in text
    assert "resumed (train epoch 2 of 2)" in text  # in the results table


def test_the_sweep_removes_what_dead_runs_left_in_the_cache(tmp_path):
    """A dead run's temporary entry and weights folders, and the fixed-name weights file of cache format 1."""
    cache = MemberCache(tmp_path, "digits")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = [cache.root / f".tmp-abc-{pid}", cache.root / "models" / f".tmp-def-{pid}"]
    for folder in left:
        folder.mkdir(parents=True)
    mine = cache.root / f".tmp-ghi-{os.getpid()}"
    mine.mkdir()
    legacy = cache.root / ".model-0123.pth"
    legacy.write_bytes(b"weights")
    os.utime(legacy, (0, 0))
    fresh = cache.root / ".model-4567.pth"
    fresh.write_bytes(b"weights")
    assert sorted(cache.sweep()) == sorted([*left, legacy])
    assert mine.is_dir() and fresh.is_file()  # a live run's, and one that may still be being written
