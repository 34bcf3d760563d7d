"""The training recipe as member options (pipelines/train/recipe.py), each tested for its effect, not its presence:
label smoothing smooths the loss, mixup and cutmix mix the batches, EMA weights differ from the live weights and
are the ones validated, predicted with and kept; each option is validated, in the training key, and in `ens plan`."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import make_project
from pipelines.config import Member, Project, load_competition

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

BASE = dict(name="m", arch="test_resnet", pretrained=False, size=32, epochs=2, lr=0.005, batch_size=64,
            num_workers=0, aug_transforms=None, tta={"n": 0})


@pytest.fixture(scope="module")
def data(digits_data, tmp_path_factory):
    from pipelines.data import load_data

    project = Project(make_project(tmp_path_factory.mktemp("recipe") / "p", digits_data))
    return load_data(project, load_competition(project, "digits"))


def _member(**options) -> Member:
    return Member(**{**BASE, **options})


# ----------------------------------------------------------------------------------------------- config
def test_options_are_validated_in_the_key_and_shown():
    from pipelines.cache import train_key

    plain = train_key(_member(), "data")
    assert train_key(_member(loss={"label_smoothing": 0.0}), "data") == plain  # no smoothing is the default loss
    keys = {train_key(_member(**o), "data") for o in ({"loss": {"label_smoothing": 0.1}}, {"mixup": {"alpha": 0.4}},
                                                       {"cutmix": {"alpha": 1.0}}, {"ema": {"decay": 0.99}},
                                                       {"ema": {"decay": 0.99, "warmup": False}})}
    assert len(keys) == 5 and plain not in keys
    assert _member(loss={"label_smoothing": 0.1}, mixup={"alpha": 0.4}, cutmix={}, ema={}).recipe() == \
        "smooth 0.1, mixup 0.4 | cutmix 0.4, EMA 0.999"
    for bad in ({"loss": {"label_smoothing": 1.0}}, {"mixup": {"alpha": 0}}, {"ema": {"decay": 1.0}},
                {"ema": {"decy": 0.9}}):
        with pytest.raises(ValidationError):
            _member(**bad)


# ----------------------------------------------------------------------------------------------- effects
class _Spy:
    """A fastai callback factory recording the loss function in use and each training batch before and after the
    mixing callbacks (which run at order 0)."""

    @staticmethod
    def make():
        from fastai.callback.core import Callback

        class Before(Callback):
            order = -1

            def __init__(self):
                self.batches = []

            def before_batch(self):
                if self.training:
                    self.batches.append([self.xb[0].detach().clone(), None])

        class After(Callback):
            order = 1

            def __init__(self, before):
                self.before, self.loss_funcs, self.handlers = before, [], []

            def before_batch(self):
                if self.training:
                    self.before.batches[-1][1] = self.xb[0].detach().clone()
                    mix = next((cb for cb in self.learn.cbs if hasattr(cb, "lam") and hasattr(cb, "yb1")), None)
                    self.handlers.append(None if mix is None else mix.lam.detach().clone())

            def after_loss(self):
                if self.training:
                    self.loss_funcs.append(self.learn.loss_func)

        before = Before()
        return before, After(before)


def test_label_smoothing_is_the_loss_trained_with(data):
    from fastai.losses import LabelSmoothingCrossEntropyFlat

    from pipelines.train import train_member

    before, after = _Spy.make()
    trained = train_member(_member(loss={"label_smoothing": 0.2}), data, cbs=[before, after])
    lf = after.loss_funcs[0]
    assert isinstance(lf, LabelSmoothingCrossEntropyFlat) and lf.eps == 0.2
    # smoothed: a confident, correct prediction still costs (plain cross-entropy would be ~0)
    logits = torch.tensor([[20.0] + [0.0] * 9])
    assert float(lf(logits, torch.tensor([0]))) == pytest.approx(0.2 * 20 * 9 / 10, rel=1e-3)
    assert float(torch.nn.functional.cross_entropy(logits, torch.tensor([0]))) < 1e-6
    assert trained.history  # and it trained


def _mixed_with(mixed: torch.Tensor, x: torch.Tensor, lam: float, i: int) -> bool:
    """Is image i of `mixed` lam × x[i] + (1 - lam) × some image of x (MixUp's blend)?"""
    other = (mixed[i] - lam * x[i]) / (1 - lam)
    return bool(((x - other).flatten(1).abs().max(1).values < 1e-3).any())


def test_mixup_blends_every_training_batch_with_a_shuffled_copy(data):
    from pipelines.train import train_member

    before, after = _Spy.make()
    train_member(_member(mixup={"alpha": 0.4}, epochs=1), data, cbs=[before, after])
    assert before.batches and all(m is not None for _, m in before.batches)
    x, mixed = before.batches[0]
    lam = after.handlers[0]
    assert not torch.equal(x, mixed)  # mixed
    assert ((lam >= 0.5) & (lam <= 1)).all() and (lam < 0.999).any()  # fastai keeps the larger share on the image
    assert all(_mixed_with(mixed, x, float(lam[i]), i) for i in range(len(x)) if lam[i] < 0.999)


def test_cutmix_pastes_a_rectangle_and_both_alternate(data):
    from pipelines.train import train_member

    before, after = _Spy.make()
    train_member(_member(cutmix={"alpha": 1.0}, epochs=1), data, cbs=[before, after])
    x, mixed = before.batches[0]
    changed = (x != mixed).any(1)  # pixels (h, w) where some image changed
    rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
    assert len(rows) and len(cols)  # a rectangle was pasted...
    inside = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    outside = torch.ones_like(changed[0])
    outside[inside] = False
    assert torch.equal(x[..., outside], mixed[..., outside])  # ...and nothing outside it changed

    before, after = _Spy.make()
    train_member(_member(mixup={"alpha": 0.4}, cutmix={"alpha": 1.0}, epochs=2), data, cbs=[before, after])
    kinds = ["mixup" if lam.numel() > 1 else "cutmix" for lam in after.handlers]  # MixUp: a share per image
    assert 0 < kinds.count("mixup") < len(kinds)  # each batch one or the other, both used


def test_ema_weights_are_validated_predicted_and_kept(data):
    from fastai.callback.core import Callback

    from pipelines.train import train_member

    class LiveWeights(Callback):
        order = 99

        def after_fit(self):
            self.live = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}

    live = LiveWeights()
    trained = train_member(_member(ema={"decay": 0.9}, epochs=3), data, cbs=[live])
    final = trained.learn.model.state_dict()
    floats = [k for k, v in final.items() if v.is_floating_point()]
    assert any(not torch.allclose(final[k], live.live[k]) for k in floats)  # the average, not the live weights
    # the last epoch's recorded validation is the average's, and the member predicts with it
    _, accuracy = trained.learn.validate()
    assert accuracy == pytest.approx(trained.history[-1]["accuracy"], abs=1e-6)


def _stopped_after_epoch_2_and_resumed(member, data, folder):
    """`member` trained with epoch checkpoints in `folder`, interrupted after its second epoch, then run again:
    (the checkpoint the interruption left, the resumed run's result)."""
    from fastai.callback.core import Callback, CancelFitException

    from pipelines.train import train_member

    class StopAfterEpoch(Callback):
        order = 70  # after the epoch's checkpoint (60)

        def after_epoch(self):
            if self.epoch == 1:
                raise CancelFitException()

    train_member(member, data, checkpoint_dir=folder, cbs=[StopAfterEpoch()])
    checkpoint = torch.load(folder / "checkpoint.pth", weights_only=False)
    return checkpoint, train_member(member, data, checkpoint_dir=folder)


def test_ema_resumes_from_its_checkpoint_to_the_same_weights(data, tmp_path):
    """The average is checkpointed with the model: an interrupted member reaches the weights of an uninterrupted
    one (the test of `test_resume`, with EMA)."""
    from pipelines.train import train_member

    member = _member(ema={"decay": 0.9}, epochs=3)
    whole = train_member(member, data).learn.model.state_dict()
    checkpoint, resumed = _stopped_after_epoch_2_and_resumed(member, data, tmp_path / "ckpt")
    assert "average" in checkpoint
    assert resumed.resumed_at == "train epoch 3 of 3"
    for k, v in whole.items():
        assert torch.allclose(resumed.learn.model.state_dict()[k].float(), v.float(), atol=1e-5), k


def test_plan_shows_the_recipe(tmp_path, digits_data):
    from conftest import ens

    yaml = ("competition: digits\ndefaults: {pretrained: false, size: 32, epochs: 1, num_workers: 0}\nmembers:\n"
            "  - {name: plain, arch: test_resnet}\n"
            "  - {name: tricks, arch: test_resnet, loss: {label_smoothing: 0.1}, mixup: {alpha: 0.4}, ema: {}}\n")
    root = make_project(tmp_path / "p", digits_data, {"r": yaml})
    out = ens("plan", "digits/r.yaml", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "smooth 0.1, mixup 0.4, EMA 0.999" in out.stdout and "recipe" in out.stdout
    assert np.sum(["—" in line for line in out.stdout.splitlines() if "plain" in line]) == 1


def test_checkpoint_averaging_is_the_mean_of_the_last_epochs_weights(data, tmp_path):
    from fastai.callback.core import Callback

    from pipelines.train import train_member

    class EpochWeights(Callback):
        order = 99

        def __init__(self):
            self.weights = []

        def after_epoch(self):
            self.weights.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})

    seen = EpochWeights()
    member = _member(average={"epochs": 2}, epochs=3)
    trained = train_member(member, data, cbs=[seen])
    final = trained.learn.model.state_dict()
    for k, v in final.items():
        if v.is_floating_point():
            assert torch.allclose(v, (seen.weights[1][k] + seen.weights[2][k]) / 2, atol=1e-6), k
    assert any(not torch.allclose(final[k], seen.weights[2][k]) for k in final if final[k].is_floating_point())

    # interrupted after the first averaged epoch: the sum is checkpointed
    _, resumed = _stopped_after_epoch_2_and_resumed(member, data, tmp_path / "ckpt")
    resumed = resumed.learn.model.state_dict()
    for k, v in final.items():
        assert torch.allclose(resumed[k].float(), v.float(), atol=1e-5), k
    with pytest.raises(ValidationError, match="keep one"):
        _member(average={"epochs": 2}, ema={})
