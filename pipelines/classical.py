"""Classical members: hand-made image features and a scikit-learn classifier, no network (seed report 001).

The main extractor is the "convolutional traces" of Guarnera, Giudice and Battiato (2020, "Fighting deepfake by
exposing the convolutional traces on images"). A generator's last layers are convolutions, so in a GAN image each
pixel is close to a fixed linear combination of its neighbours; a camera image follows other (demosaicing, JPEG)
relations. Each colour channel is modelled as a mixture of two models:

- M1: I(x, y) = Σ α_ij · I(x+i, y+j) + N(0, σ²), the sum over the k×k neighbourhood without its centre;
- M2: an outlier, uniform over the 256 grey levels.

Expectation-Maximisation alternates
- E-step: the posterior w(x, y) that the pixel follows M1 (prior 1/2 each), from the residual
  r = I(x, y) − Σ α_ij I(x+i, y+j): w = G(r; σ) / (G(r; σ) + 1/256), G the Gaussian density;
- M-step: α by least squares weighted by w over all pixels, and σ² = Σ w r² / Σ w.
The kernel α after the last iteration (k·k − 1 numbers per channel, 24 for k = 3) is the feature vector: it says
how the image's pixels were computed from their neighbours, whatever the image shows. `color_histograms` is a
cheap, content-level extractor to compare against.

An arch names extractors and a classifier: "classical:em_traces+color_hist/svc" (`parse_arch`); `fit_predict`
fits on training images and returns class probabilities for evaluation sets.

numpy only at import; scikit-learn is imported inside the functions that build classifiers.
"""

from __future__ import annotations

import difflib

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .config import CLASSICAL as PREFIX

CHUNK_BYTES = 256 * 2**20  # working memory of one chunk of images in `em_traces`
UNIFORM_DENSITY = 1 / 256  # M2: an outlier is any of the 256 grey levels
MIN_SIGMA2 = 1e-6  # a constant (or exactly predicted) channel has σ → 0: clip it, the weights stay finite
RIDGE = 1e-9  # times the normal matrix's mean diagonal, plus itself: a constant channel's matrix is singular


# --------------------------------------------------------------------------------------------- em traces
def _neighbourhoods(chunk: np.ndarray, kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's pixels as regression rows: X (n, 3, P, k²−1) the neighbours, y (n, 3, P) the centres, for
    the P pixels whose k×k window fits in the image."""
    planes = chunk.transpose(0, 3, 1, 2).astype(np.float64)  # (n, 3, H, W): grey levels 0..255, as M2 assumes
    windows = sliding_window_view(planes, (kernel, kernel), axis=(2, 3))  # (n, 3, H', W', k, k), a view
    rows, cols = np.divmod(np.arange(kernel * kernel), kernel)
    centre = kernel // 2 * kernel + kernel // 2  # for an even k, the pixel right and below of the middle
    around = np.arange(kernel * kernel) != centre
    n, c = planes.shape[:2]
    x = windows[..., rows[around], cols[around]].reshape(n, c, -1, kernel * kernel - 1)  # one copy
    y = windows[..., kernel // 2, kernel // 2].reshape(n, c, -1)
    return x, y


def _residual(x: np.ndarray, y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return y - (x @ alpha[..., None])[..., 0]


def _posterior(r: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """E-step: P(M1 | r). Written as a sigmoid of the log-likelihood ratio, so that tiny σ or huge residuals
    give 0 or 1 instead of 0/0."""
    log_gauss = -r**2 / (2 * sigma2[..., None]) - 0.5 * np.log(2 * np.pi * sigma2[..., None])
    return 0.5 * (1 + np.tanh((log_gauss - np.log(UNIFORM_DENSITY)) / 2))


def _weighted_lstsq(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """M-step for α: the normal equations (Xᵀ W X + λI) α = Xᵀ W y of every image and channel, solved at once."""
    xw = x * w[..., None]
    a = xw.swapaxes(-1, -2) @ x
    b = (xw.swapaxes(-1, -2) @ y[..., None])[..., 0]
    eye = np.eye(a.shape[-1])
    ridge = RIDGE * np.trace(a, axis1=-2, axis2=-1)[..., None, None] / a.shape[-1] + RIDGE
    return np.linalg.solve(a + ridge * eye, b[..., None])[..., 0]


def _weighted_sigma2(r: np.ndarray, w: np.ndarray) -> np.ndarray:
    total = np.maximum(w.sum(-1), np.finfo(float).tiny)
    return np.maximum((w * r**2).sum(-1) / total, MIN_SIGMA2)


def _em_chunk(chunk: np.ndarray, kernel: int, iterations: int, alpha0: np.ndarray) -> np.ndarray:
    x, y = _neighbourhoods(chunk, kernel)
    alpha = np.broadcast_to(alpha0, (len(chunk), *alpha0.shape))
    r = _residual(x, y, alpha)
    sigma2 = np.maximum((r**2).mean(-1), MIN_SIGMA2)
    for _ in range(iterations):
        w = _posterior(r, sigma2)
        alpha = _weighted_lstsq(x, y, w)
        r = _residual(x, y, alpha)
        sigma2 = _weighted_sigma2(r, w)
    return alpha.reshape(len(chunk), -1)


def _chunk_images(shape: tuple, kernel: int) -> int:
    """Images per chunk within CHUNK_BYTES: X and its weighted copy (k²−1 values a pixel) and ~5 per-pixel
    arrays (y, r, w, temporaries), float64, per channel."""
    _, h, w, c = shape
    pixels = (h - kernel + 1) * (w - kernel + 1) * c
    return max(1, CHUNK_BYTES // (8 * pixels * (2 * (kernel * kernel - 1) + 5)))


def em_traces(images: np.ndarray, kernel: int = 3, iterations: int = 20, seed: int = 0,
              chunk_size: int | None = None) -> np.ndarray:
    """The EM kernel α of every image and channel: uint8 (N, H, W, 3) → float32 (N, 3·(k·k−1)).

    Every image starts from the same random α (convex weights drawn from `seed`, as the paper starts randomly),
    so an image's features do not depend on the batch it is in; `chunk_size` images are processed at once
    (by default as many as fit in CHUNK_BYTES)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] < kernel or images.shape[2] < kernel:
        raise ValueError(f"em_traces needs images (N, H, W, C) of at least {kernel}×{kernel} pixels, "
                         f"got shape {images.shape}")
    u = np.random.default_rng(seed).random((images.shape[3], kernel * kernel - 1))
    alpha0 = u / u.sum(-1, keepdims=True)
    step = chunk_size or _chunk_images(images.shape, kernel)
    out = [_em_chunk(images[i:i + step], kernel, iterations, alpha0) for i in range(0, len(images), step)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, alpha0.size), np.float32)


# --------------------------------------------------------------------------------------------- colour histogram
def color_histograms(images: np.ndarray, bins: int = 16) -> np.ndarray:
    """Each channel's histogram of grey levels in `bins` equal bins, as fractions of the pixels, concatenated:
    uint8 (N, H, W, C) → float32 (N, C·bins)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    level = images.astype(np.int64) * bins // 256  # (N, H, W, C) bin of each value
    flat = level + bins * np.arange(c) + bins * c * np.arange(n)[:, None, None, None]
    counts = np.bincount(flat.ravel(), minlength=n * c * bins).reshape(n, c * bins)
    return (counts / max(h * w, 1)).astype(np.float32)


# --------------------------------------------------------------------------------------------- classifiers
def _random_forest(seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=-1)


def _svc(seed: int):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(probability=True, random_state=seed))


def _logistic(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))


EXTRACTORS = {"em_traces": em_traces, "color_hist": color_histograms}
CLASSIFIERS = {"random_forest": _random_forest, "svc": _svc, "logistic": _logistic}


# --------------------------------------------------------------------------------------------- arch names
def _unknown(kind: str, name: str, known: dict, arch: str) -> ValueError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(f"unknown {kind} '{name}' in '{arch}'{hint}; known {kind}s: {', '.join(sorted(known))}")


def parse_arch(arch: str) -> tuple[list[str], str]:
    """"classical:em_traces+color_hist/svc" → (["em_traces", "color_hist"], "svc")."""
    body = arch[len(PREFIX):] if arch.startswith(PREFIX) else None
    parts = body.split("/") if body is not None else []
    names = parts[0].split("+") if len(parts) == 2 else []
    if not names or not all(names) or not parts[1]:
        raise ValueError(f"malformed classical arch '{arch}': write '{PREFIX}EXTRACTOR[+EXTRACTOR...]/CLASSIFIER', "
                         f"e.g. '{PREFIX}em_traces+color_hist/svc'")
    for name in names:
        if name not in EXTRACTORS:
            raise _unknown("extractor", name, EXTRACTORS, arch)
    if len(set(names)) < len(names):
        raise ValueError(f"an extractor is named twice in '{arch}': name each once")
    if parts[1] not in CLASSIFIERS:
        raise _unknown("classifier", parts[1], CLASSIFIERS, arch)
    return names, parts[1]


# --------------------------------------------------------------------------------------------- fit and predict
def extract(names: list[str], images: np.ndarray, seed: int = 0, kernel: int = 3, iterations: int = 20) -> np.ndarray:
    """The named extractors' features of `images`, side by side."""
    options = {"em_traces": {"kernel": kernel, "iterations": iterations, "seed": seed}}
    return np.concatenate([EXTRACTORS[n](images, **options.get(n, {})) for n in names], axis=1)


def _full_probabilities(model, features: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba's columns (the classes seen in training) placed among all n_classes, rows renormalised."""
    out = np.zeros((len(features), n_classes))
    out[:, model.classes_] = model.predict_proba(features)
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


def fit_predict(arch: str, train_images: np.ndarray, train_targets: np.ndarray, eval_sets: dict[str, np.ndarray],
                seed: int = 0, kernel: int = 3, iterations: int = 20,
                n_classes: int | None = None) -> dict[str, np.ndarray]:
    """Fit `arch`'s classifier on the training images' features; {name: float32 (N, C) probabilities} for each
    evaluation set, columns the classes 0..C−1 (C = n_classes, by default the largest training target + 1; a
    class absent from training gets probability 0, and a single training class gets all of it)."""
    names, classifier = parse_arch(arch)
    targets = np.asarray(train_targets).astype(np.int64)
    n_classes = n_classes or int(targets.max()) + 1
    train = extract(names, train_images, seed, kernel, iterations)
    evals = {k: extract(names, v, seed, kernel, iterations) for k, v in eval_sets.items()}
    if len(np.unique(targets)) == 1:  # scikit-learn refuses to fit one class: it is then certain
        return {k: np.eye(n_classes, dtype=np.float32)[np.full(len(v), targets[0])] for k, v in evals.items()}
    model = CLASSIFIERS[classifier](seed).fit(train, targets)
    return {k: _full_probabilities(model, v, n_classes) for k, v in evals.items()}
