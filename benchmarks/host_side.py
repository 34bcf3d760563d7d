"""11. The host side of a training step at paddy shapes, on the CPU (issue 23 item 3): a proxy, guarded without a
GPU, for "end-to-end at >= 0.9 of the model's own speed". Per paddy/final.yaml member and stage size, batch 32:

- gather: a batch gathered from a decoded copy (a uint8 memmap of S x S x 3 images, in the page cache) and
  collated, as ens's prefetch thread does (`DecodedSplit.batch`; pinned too on CUDA, not here: no CUDA);
- main thread: its CPU time per batch in fastai's loop around a no-op model (one parameter; ens's callbacks: the
  on-device Recorder, the one-cycle scheduler) over batches handed over by the prefetch thread, the batch
  transforms left out (on CUDA they are GPU kernels);
- before: the same loop without the prefetch and with fastai's own Recorder (the gather in the main thread, a
  read of the loss back every step): what ens did before issue 23.
CPU times of the thread (`time.thread_time`): other processes on a shared machine do not inflate them, as they do
wall time. Side by side, alternating, medians;

against the time one training step of the member's network takes on a GPU. That step is from timm's published
training benchmark (huggingface/pytorch-image-models, results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv:
AMP, channels-last, RTX 3090: convnext_small 487.15 images/s and vit_small_patch16_224 1057.92 images/s at 224),
scaled to the stage size by pixels. An 8 GB-class card (RTX 3070: half the 3090's memory bandwidth, 0.57 of its
fp16 tensor FLOPs with fp32 accumulation; T4 slower still) takes longer per step, so the ratio against the 3090's
step is the strict one. Goal: the main thread's side <= 25 % of the step, the gather (in its own thread) too.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCH = 32
ROUNDS = 3
# timm's results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv: training images/s at 224 px (AMP, NHWC)
RTX3090_TRAIN_224 = {"convnext_small_in22k": 487.15, "vit_small_patch16_224": 1057.92}
CARD = "RTX 3090 (timm's train benchmark, AMP, NHWC), scaled by pixels"


def gpu_step_ms(arch: str, size: int) -> float:
    """One training step of batch 32 on the reference card, in ms (timm's figure at 224, scaled by pixels)."""
    return BATCH / RTX3090_TRAIN_224[arch] * (size / 224) ** 2 * 1000


class _Copy:
    """A decoded copy's stand-in: `images`, a uint8 memmap N x S x S x 3 (what `decoded.Decoded.images` is)."""

    def __init__(self, path: Path, n: int, size: int):
        import numpy as np

        images = np.lib.format.open_memmap(path, mode="w+", dtype="uint8", shape=(n, size, size, 3))
        images[:] = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype="uint8")
        images.flush()
        self.images = np.load(path, mmap_mode="r")


def _loaders(copy, n: int, prefetch: int):
    import numpy as np
    from fastai.data.core import DataLoaders

    from pipelines.data.fastai_parts import DecodedDL, DecodedSplit

    labels = np.arange(n, dtype="int64") % 10
    split = lambda rows, i: DecodedSplit(copy, rows, labels[rows], [str(c) for c in range(10)], i)  # noqa: E731
    train = DecodedDL(split(np.arange(n), 0), bs=BATCH, shuffle=True, drop_last=True, device="cpu",
                      num_workers=0)  # as ens for a decoded copy (`accel.loader_options`)
    train.prefetch = prefetch
    valid = train.new(split(np.arange(BATCH), 1), shuffle=False)
    return DataLoaders(train, valid, device="cpu")


def _noop_learner(dls, on_device: bool):
    import torch
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import noop

    from pipelines.train.on_device import OnDeviceRecords

    class NoOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, 10))

        def forward(self, x):
            return self.w.expand(len(x), 10)

    learn = Learner(dls, NoOp(), loss_func=CrossEntropyLossFlat(), metrics=[accuracy])
    learn.remove_cb(ProgressCallback)
    learn.logger = noop
    if on_device:
        learn.add_cb(OnDeviceRecords())
    return learn


def gather_ms(copy, n: int) -> float:
    import numpy as np

    from pipelines.data.fastai_parts import DecodedSplit

    split = DecodedSplit(copy, np.arange(n), np.zeros(n, dtype="int64"), ["0"], 0)
    rng = np.random.default_rng(1)
    times = []
    for _ in range(20):
        idx = rng.choice(n, BATCH, replace=False)
        start = time.thread_time()  # CPU time: other processes on a shared machine do not inflate it
        split.batch(idx)
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1000


def loop_ms(copy, n: int, new: bool, clock=time.perf_counter) -> float:
    """ms per training batch of a 2-epoch fit_one_cycle of the no-op model (the second epoch timed), by `clock`
    (`time.thread_time`: the main thread's CPU time, which other processes on a shared machine do not inflate)."""
    from fastai.callback.core import Callback

    dls = _loaders(copy, n, prefetch=2 if new else 0)

    class Clock(Callback):
        def before_train(self):
            self.start, self.n = clock(), 0

        def after_batch(self):
            self.n += self.training

        def after_train(self):
            self.ms = (clock() - self.start) / self.n * 1000

    timer = Clock()
    learn = _noop_learner(dls, on_device=new)
    learn.fit_one_cycle(2, 1e-3, cbs=[timer])
    return timer.ms


def members() -> list[tuple[str, str, int]]:
    """(member name, arch, stage size) of ensembles/paddy/final.yaml."""
    from pipelines.config import Project, load_ensemble

    _, ens, _ = load_ensemble(Project(REPO), "paddy/final.yaml", ["members.*.pretrained=false"])
    return [(m.name, m.arch, int(s if isinstance(s, int) else s[0])) for m in ens.members for s, _ in m.stage_plan]


def main() -> list[str]:
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        by_size = {}
        for name, arch, size in members():
            by_size.setdefault(size, []).append((name, arch))
        for size, who in sorted(by_size.items()):
            n = 16 * BATCH
            copy = _Copy(Path(tmp) / f"images-{size}.npy", n, size)
            g, loop, old = [], [], []
            for _ in range(ROUNDS):  # alternating arms
                g.append(gather_ms(copy, n))
                loop.append(loop_ms(copy, n, new=True, clock=time.thread_time))
                old.append(loop_ms(copy, n, new=False, clock=time.thread_time))
            g, loop, old = (statistics.median(v) for v in (g, loop, old))
            for name, arch in who:
                step = gpu_step_ms(arch, size)
                host = max(g, loop)  # overlapped: the gather in its thread, the loop in the main thread
                rows.append(f"| 11. host side per batch of 32 at {size} px, {name} ({arch}): max(gather {g:.1f} in "
                            f"the prefetch thread, main thread {loop:.1f}) ms CPU / GPU step {step:.0f} ms ({CARD}); "
                            f"before (gather in the loop, a loss read per step): main thread {old:.1f} ms, "
                            f"{old / step:.2f} of the step, not overlapped | {host:.1f} / {step:.0f} ms | "
                            f"**{host / step:.2f}** | <= 0.25 |")
            del copy
    return rows


if __name__ == "__main__":
    rows = main()
    print("\n".join(rows))
    if "--write" in sys.argv[1:]:
        sys.path.insert(0, str(HERE))
        from run_all import write_rows

        write_rows("11. host side", rows)
