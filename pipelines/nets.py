"""The seeds' from-scratch CNNs, nameable as `ens:NAME` in an ensemble (see models.py for the naming rule).

Every net is an `nn.Sequential(body, head)`, like fastai's vision learners, so that `body_head_split` gives the
usual two parameter groups; each takes any reasonable input size (a size-independent pool before the first dense
layer) and returns logits (fastai's loss and `get_preds` add the softmax the Keras tables end with).

- `lenet5` (seed 000): LeCun et al. 1998 — C1 6×5×5 conv, P1 2×2 pool, C2 16×5×5 conv, P2 pool, FC1 120, FC2 84,
  FC3 n_out; ReLU and max pooling (the modern reading of the paper's squashing and subsampling). At 32×32 the
  P2 map is the paper's 16×5×5; other sizes are average-pooled to 5×5 first. Input ≥ 14 px.
- `alexnet_bn` (seed 003): AlexNet's features (torchvision's widths: 11×11/4 64, 5×5 192, 3×3 384, 256, 256, ReLU,
  3×3/2 max pools), ONE batch norm between the features and the classifier (the seed removed the others: with
  them validation was noisy, without this one the net did not learn), then a dropout-ReLU classifier scaled to
  1024 units (AlexNet's 4096 would be 55M parameters); the last max pool is adaptive, to 3×3. Input ≥ 31 px.
- `cifar_cnn` (seed 004): the seed's layer table, row for row: 3×3 'same' convolutions with ReLU, each followed
  by batch norm; conv 32, conv 32, pool, dropout .2, conv 64, conv 32, pool, dropout .2, conv 128, pool,
  dropout .2, flatten (2048 at 32×32), dense 256 relu, dropout .45, dense n_out. Batch norm uses PyTorch's
  momentum (Keras' 0.99 would leave the running statistics far behind in a few epochs). Input ≥ 8 px.

torch is imported inside the constructors: importing this module (to know the names) costs nothing.
"""

from __future__ import annotations

from typing import Callable

NOTES = {
    "lenet5": "from scratch: LeNet-5 (LeCun 1998), for small grey-scale-like images",
    "alexnet_bn": "from scratch: AlexNet features, one batch norm before the classifier",
    "cifar_cnn": "from scratch: 5 convs with batch norm, dense 256, for 32 px images",
}


def _make_grid_flatten():
    from torch import nn

    class GridFlatten(nn.Module):
        """Keras' Flatten of a `grid`×`grid` map: where the map already has that size (the seeds' 32×32 inputs) it
        is a plain flatten; other input sizes are average-pooled to the grid first, so that the dense layer after
        it keeps its inputs."""

        def __init__(self, grid: int):
            super().__init__()
            self.grid = grid

        def forward(self, x):
            if tuple(x.shape[-2:]) != (self.grid, self.grid):
                x = nn.functional.adaptive_avg_pool2d(x, self.grid)
            return x.flatten(1)

        def extra_repr(self) -> str:
            return f"grid={self.grid}"

    GridFlatten.__module__, GridFlatten.__qualname__ = __name__, "GridFlatten"
    return GridFlatten


def __getattr__(name: str):
    """`GridFlatten` is made on first use (torch imported then) and kept as a module attribute, so that a pickled
    model finds it here."""
    if name == "GridFlatten":
        cls = globals()["GridFlatten"] = _make_grid_flatten()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _grid_flatten():
    import sys

    return getattr(sys.modules[__name__], "GridFlatten")


def lenet5(n_out: int, n_in: int = 3):
    from torch import nn

    body = nn.Sequential(
        nn.Conv2d(n_in, 6, 5), nn.ReLU(inplace=True),  # C1
        nn.MaxPool2d(2),  # P1
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True),  # C2
        nn.MaxPool2d(2),  # P2
    )
    head = nn.Sequential(
        _grid_flatten()(5),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),  # FC1
        nn.Linear(120, 84), nn.ReLU(inplace=True),  # FC2
        nn.Linear(84, n_out),  # FC3
    )
    return nn.Sequential(body, head)


def alexnet_bn(n_out: int, n_in: int = 3, hidden: int = 1024):
    from torch import nn

    body = nn.Sequential(
        nn.Conv2d(n_in, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveMaxPool2d(3),
    )
    head = nn.Sequential(
        nn.Flatten(),
        nn.BatchNorm1d(256 * 3 * 3),  # the one batch norm, between the features and the classifier
        nn.Dropout(0.5), nn.Linear(256 * 3 * 3, hidden), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, n_out),
    )
    return nn.Sequential(body, head)


def cifar_cnn(n_out: int, n_in: int = 3):
    from torch import nn

    def conv(c_in, c_out):  # Conv2D(c_out, 3×3, relu, padding=same) + BatchNormalization
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(c_out)]

    body = nn.Sequential(
        *conv(n_in, 32), *conv(32, 32), nn.MaxPool2d(2), nn.Dropout(0.2),
        *conv(32, 64), *conv(64, 32), nn.MaxPool2d(2), nn.Dropout(0.2),
        *conv(32, 128), nn.MaxPool2d(2), nn.Dropout(0.2),
    )
    head = nn.Sequential(
        _grid_flatten()(4),  # 4×4×128 = 2048 at 32×32
        nn.Linear(128 * 4 * 4, 256), nn.ReLU(inplace=True), nn.Dropout(0.45),
        nn.Linear(256, n_out),
    )
    return nn.Sequential(body, head)


NETS: dict[str, Callable] = {"lenet5": lenet5, "alexnet_bn": alexnet_bn, "cifar_cnn": cifar_cnn}


def names() -> list[str]:
    return sorted(NETS)


def build(name: str, n_out: int, n_in: int = 3):
    """A fresh, randomly initialised net (PyTorch's default initialisation)."""
    return NETS[name](n_out, n_in)


def body_head_split(model):
    """fastai splitter: [body parameters, head parameters] (as vision_learner's default split)."""
    from fastai.torch_core import params

    return [params(model[0]), params(model[1])]
