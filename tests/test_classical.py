"""Classical members (`pipelines/classical.py`): the EM convolutional traces checked against least squares computed
here independently, with and without outliers; batching, chunking and seeds; separating two classes of synthetic
images that differ only in how their pixels were filtered; arch names. Images are numpy arrays made here."""

import time

import numpy as np
import pytest

from pipelines.classical import color_histograms, em_traces, fit_predict, parse_arch

# a lopsided smoothing kernel: neighbours predict the centre, and a mirrored or transposed α would be wrong
SMOOTH = np.array([[1.0, 3.0, 1.0], [2.0, 4.0, 2.0], [0.0, 1.0, 1.0]])
BOX = np.ones((3, 3))
HORIZONTAL = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def filtered(rng, n, size, kernel=SMOOTH, channels=3):
    """uint8 (n, size, size, channels): white noise filtered by `kernel`, every image rescaled to mean 128 and
    standard deviation 40, so that images made with different kernels share their colour statistics."""
    kh, kw = kernel.shape
    noise = rng.normal(size=(n, size + kh - 1, size + kw - 1, channels))
    out = sum(kernel[i, j] * noise[:, i:i + size, j:j + size] for i in range(kh) for j in range(kw))
    out = (out - out.mean((1, 2), keepdims=True)) / out.std((1, 2), keepdims=True)
    return np.clip(np.rint(128 + 40 * out), 0, 255).astype(np.uint8)


def lstsq_alpha(image, k=3):
    """Plain least squares of each channel's pixel on its k×k neighbours (row-major, centre left out), built by
    slicing: the features' expected layout."""
    h, w, _ = image.shape
    img = image.astype(np.float64)
    shifted = {(i, j): img[i:h - k + 1 + i, j:w - k + 1 + j] for i in range(k) for j in range(k)}
    centre = shifted.pop((k // 2, k // 2))
    x = np.stack(list(shifted.values()), axis=-1)  # (H', W', C, k²−1)
    return np.concatenate([np.linalg.lstsq(x[..., c, :].reshape(-1, k * k - 1), centre[..., c].ravel(),
                                           rcond=None)[0] for c in range(image.shape[2])])


def with_outliers(rng, image, fraction):
    out = image.copy()
    hit = rng.random(image.shape) < fraction
    out[hit] = rng.integers(0, 256, hit.sum())
    return out


def accuracy(probs, targets):
    return float((probs.argmax(1) == targets).mean())


# --------------------------------------------------------------------------------------------- EM
def test_em_recovers_the_least_squares_kernel_and_resists_outliers():
    rng = np.random.default_rng(0)
    image = filtered(rng, 1, 96)[0]
    clean = lstsq_alpha(image)
    assert np.abs(em_traces(image[None])[0] - clean).max() < 0.02

    # 10% of the values replaced by uniform noise: ~60% of the 3×3 windows hold one, so least squares is dragged
    # away; EM's E-step gives those windows small weights. With the weights all 1, EM *is* least squares.
    corrupted = with_outliers(rng, image, 0.1)
    em_error = np.linalg.norm(em_traces(corrupted[None])[0] - clean)
    ls_error = np.linalg.norm(lstsq_alpha(corrupted) - clean)
    assert em_error < 0.85 * ls_error, (em_error, ls_error)

    fewer = with_outliers(rng, image, 0.02)  # with fewer outliers the gap widens
    assert np.linalg.norm(em_traces(fewer[None])[0] - clean) < 0.5 * np.linalg.norm(lstsq_alpha(fewer) - clean)


def test_batches_chunks_and_seeds_do_not_change_an_images_features():
    images = filtered(np.random.default_rng(1), 5, 24)
    batch = em_traces(images, iterations=10, seed=3)
    alone = np.concatenate([em_traces(im[None], iterations=10, seed=3) for im in images])
    chunked = em_traces(images, iterations=10, seed=3, chunk_size=2)
    assert batch.shape == (5, 24) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    np.testing.assert_allclose(batch, chunked, atol=1e-5)
    assert np.array_equal(batch, em_traces(images, iterations=10, seed=3))
    assert em_traces(images, kernel=5, iterations=2).shape == (5, 3 * 24)


def test_constant_images_give_finite_features():
    images = np.stack([np.full((16, 16, 3), v, np.uint8) for v in (0, 128, 255)])
    assert np.isfinite(em_traces(images)).all()


def test_color_histograms_are_per_channel_fractions():
    images = filtered(np.random.default_rng(2), 3, 20)
    h = color_histograms(images, bins=8)
    assert h.shape == (3, 24) and h.dtype == np.float32
    expected = np.histogram(images[1, ..., 2], bins=8, range=(0, 256))[0] / 400
    np.testing.assert_allclose(h[1, 16:], expected, atol=1e-6)


# --------------------------------------------------------------------------------------------- classifiers
def test_traces_separate_classes_that_colour_histograms_cannot():
    rng = np.random.default_rng(4)
    images = np.concatenate([filtered(rng, 40, 32, BOX), filtered(rng, 40, 32, HORIZONTAL)])
    targets = np.repeat([0, 1], 40)
    order = rng.permutation(80)
    train, held = order[:60], order[60:]

    def score(arch):
        probs = fit_predict(arch, images[train], targets[train], {"held": images[held]}, iterations=10)["held"]
        assert probs.shape == (20, 2) and probs.dtype == np.float32
        return accuracy(probs, targets[held])

    traces, colours = score("classical:em_traces/logistic"), score("classical:color_hist/logistic")
    print(f"\nheld-out accuracy: traces {traces:.2f}, colour histograms {colours:.2f}")
    assert traces >= 0.9 and colours <= 0.75, (traces, colours)


def test_classes_absent_from_training_get_zero_columns():
    images = filtered(np.random.default_rng(5), 12, 16)
    probs = fit_predict("classical:color_hist/random_forest", images, np.repeat([0, 2], 6),
                        {"a": images[:4], "b": images[4:]}, n_classes=4)
    assert probs["a"].shape == (4, 4) and probs["b"].shape == (8, 4)
    assert (probs["a"][:, [1, 3]] == 0).all()
    np.testing.assert_allclose(probs["b"].sum(1), 1, atol=1e-6)
    one = fit_predict("classical:color_hist/svc", images, np.ones(12), {"a": images[:3]})["a"]
    np.testing.assert_array_equal(one, [[0, 1]] * 3)


# --------------------------------------------------------------------------------------------- arch names
def test_parse_arch():
    assert parse_arch("classical:em_traces+color_hist/svc") == (["em_traces", "color_hist"], "svc")
    assert parse_arch("classical:color_hist/random_forest") == (["color_hist"], "random_forest")


@pytest.mark.parametrize("arch, words", [
    ("classical:em_trace/svc", ["extractor 'em_trace'", "did you mean 'em_traces'", "color_hist"]),
    ("classical:em_traces/svm", ["classifier 'svm'", "did you mean 'svc'", "logistic, random_forest, svc"]),
    ("classical:em_traces", ["malformed", "EXTRACTOR", "/CLASSIFIER"]),
    ("em_traces/svc", ["malformed", "classical:"]),
    ("classical:em_traces+/svc", ["malformed"]),
    ("classical:em_traces+em_traces/svc", ["twice"]),
])
def test_parse_arch_errors_name_the_problem_and_the_fix(arch, words):
    with pytest.raises(ValueError) as error:
        parse_arch(arch)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


# --------------------------------------------------------------------------------------------- cost
@pytest.mark.slow
def test_cost_per_224_image():
    """Measured, not asserted: seconds per 224×224 image, k = 3, 20 iterations, a batch of 16."""
    images = filtered(np.random.default_rng(6), 16, 224)
    start = time.perf_counter()
    features = em_traces(images)
    seconds = (time.perf_counter() - start) / len(images)
    print(f"\nem_traces: {seconds:.3f} s per 224x224 image (k=3, 20 iterations, batch of 16)")
    assert np.isfinite(features).all()
