"""TTA views (`tta.views`: hflip, vflip, {scale}, {crops}): each view's probabilities are cached apart and are the
member's predictions on that view of the images; the TTA is the mean of the beta blend and the views; a subset of
cached views is derived without predicting; `ens ablate` says which views help."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import make_project
from pipelines.cache import MemberCache, prediction_key, tta_probs_of
from pipelines.config import Member, Project

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

VIEWS = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 2, lr: 0.005, batch_size: 64, num_workers: 0,
           aug_transforms: {do_flip: false, max_rotate: 10}}
members:
  - {name: resnet, arch: test_resnet, tta: {n: 2, beta: 0.25, views: [hflip, vflip, {scale: 1.15}, {crops: 0.875}]}}
"""


@pytest.fixture(scope="module")
def viewed(tmp_path_factory, digits_data):
    from pipelines.run import run_ensemble

    root = make_project(tmp_path_factory.mktemp("views") / "p", digits_data, {"views": VIEWS})
    return root, run_ensemble(Project(root), "digits/views.yaml", submit=False)


def test_each_view_is_cached_apart_and_the_tta_is_their_mean_with_the_blend(viewed):
    _, result = viewed
    (o,) = result.members
    arrays = o.entry.arrays
    names = ["crops0.875", "hflip", "scale1.15", "vflip"]
    assert o.entry.meta["key_fields"]["tta"]["views"] == names
    for split in ("valid", "test"):
        views = [arrays[f"{split}_view_{v}"] for v in names]
        assert all(v.shape == arrays[f"{split}_plain"].shape for v in views)
        assert all(not np.allclose(v, arrays[f"{split}_plain"]) for v in views)  # each is another view
        blend = arrays[f"{split}_aug"] + 0.25 * (arrays[f"{split}_plain"] - arrays[f"{split}_aug"])
        assert np.allclose(arrays[f"{split}_tta"], np.mean([blend, *views], axis=0), atol=1e-6)


def test_a_view_is_the_members_prediction_on_that_view_of_the_images(viewed, digits_data):
    """hflip and a zoom, recomputed by hand from the kept weights on the normalised validation batch."""
    import torch.nn.functional as F

    from pipelines.config import load_competition
    from pipelines.data import load_data
    from pipelines.predict import learner_from_weights

    root, result = viewed
    (o,) = result.members
    project = Project(root)
    data = load_data(project, load_competition(project, "digits"))
    kept = MemberCache(project.cache, "digits").model_meta(o.entry.train_key)
    learn = learner_from_weights(o.member, data, o.entry.model_path, kept["normalize"])
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad():
        flipped = torch.softmax(learn.model(x.flip(-1)), 1).numpy()
        h = x.shape[-1]
        c = round(h / 1.15)
        y0 = round((h - c) * 0.5)
        zoomed = F.interpolate(x[..., y0:y0 + c, y0:y0 + c], size=(h, h), mode="bilinear", align_corners=False)
        zoom = torch.softmax(learn.model(zoomed), 1).numpy()
    n = len(x)
    assert np.allclose(o.entry.arrays["valid_view_hflip"][:n], flipped, atol=1e-5)
    assert np.allclose(o.entry.arrays["valid_view_scale1.15"][:n], zoom, atol=1e-5)


def test_fewer_views_are_derived_from_the_cache_without_predicting(viewed):
    from pipelines.run import run_ensemble

    root, full = viewed
    result = run_ensemble(Project(root), "digits/views.yaml", ["members.resnet.tta.views=[hflip, {scale: 1.15}]"],
                          submit=False)
    (o,) = result.members
    assert o.how == "derived" and o.entry.key != full.members[0].entry.key
    arrays = full.members[0].entry.arrays
    expected = tta_probs_of(arrays, "valid", 0.25, 2, ["hflip", "scale1.15"])
    assert np.array_equal(o.entry.arrays["valid_tta"], expected)
    assert "valid_view_vflip" not in o.entry.arrays  # only the views it names


def test_ablate_scores_each_view(viewed):
    from pipelines import ensemble
    from pipelines.ablate import ablate

    root, result = viewed
    r = ablate(Project(root), "digits/views.yaml", cached_only=True)
    rows = {row.view: row for row in r.views}
    arrays = result.members[0].entry.arrays
    targets = arrays["valid_targets"]
    assert set(rows) == {"plain + passes", "crops0.875", "hflip", "scale1.15", "vflip"}
    assert rows["hflip"].alone == ensemble.score("accuracy", arrays["valid_view_hflip"], targets)
    without = tta_probs_of(arrays, "valid", 0.25, 2, ["crops0.875", "scale1.15", "vflip"])
    assert rows["hflip"].without == ensemble.score("accuracy", without, targets)
    assert rows["hflip"].tta == ensemble.score("accuracy", arrays["valid_tta"], targets)


def test_views_are_validated_and_none_leave_the_key_alone():
    base = dict(name="m", arch="test_resnet", pretrained=False)
    assert prediction_key("t", Member(**base)) == prediction_key("t", Member(**base, tta={"views": []}))
    assert prediction_key("t", Member(**base, tta={"views": ["hflip", "vflip"]})) == \
        prediction_key("t", Member(**base, tta={"views": ["vflip", "hflip", "hflip"]}))  # order and repeats
    for bad in (["flip"], [{"scale": 1.0}], [{"crops": 1.0}], [{"scale": 1.2, "crops": 0.9}]):
        with pytest.raises(ValidationError):
            Member(**base, tta={"views": bad})
