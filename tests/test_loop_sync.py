"""The training loop's host side (issue 23): the decoded loader's background prefetch gives exactly the batches of
fastai's own loop and stops with its loop however it ends; the Recorder's losses and metrics are kept on the
device and read once per epoch (zero reads of a tensor back to the host per training step once warm), recording
the same numbers as fastai's; the batches travel as uint8 and become floats after the copy."""

import threading
import time
import traceback

import pytest
import torch

from conftest import make_project
from pipelines.config import Member, Project, load_competition
from pipelines.data import dataloaders, load_data
from pipelines.data.prefetch import Prefetch, prefetch_threads


@pytest.fixture(scope="module")
def digits(tmp_path_factory, digits_data):
    project = Project(make_project(tmp_path_factory.mktemp("sync") / "project", digits_data))
    return load_data(project, load_competition(project, "digits"))


def _member(**kw):
    base = dict(name="m", arch="test_resnet", pretrained=False, size=32, epochs=2, batch_size=64, num_workers=0,
                lr=0.005, decode=True, tta={"n": 0},
                aug_transforms={"do_flip": True, "max_rotate": 10, "max_warp": 0.2, "max_lighting": 0.2})
    return Member(**{**base, **kw})


def _epoch(dl):
    return [tuple(t.clone() for t in b) for b in dl]


def _prefetch(monkeypatch, depth):
    from pipelines.data.fastai_parts import DecodedDL

    monkeypatch.setattr(DecodedDL, "prefetch", depth)


def _wait_no_threads(seconds=2.0):
    end = time.monotonic() + seconds
    while prefetch_threads() and time.monotonic() < end:
        time.sleep(0.01)
    return prefetch_threads()


def test_prefetched_batches_are_fastais_own_in_order_with_the_same_random_draws(digits, monkeypatch):
    """Two seeded epochs of training batches (shuffled, augmented) and the validation batches: identical with the
    prefetch thread and without; and the thread really ran (the batches were gathered off the main thread)."""
    from fastai.torch_core import set_seed

    from pipelines.data.fastai_parts import DecodedSplit

    member = _member()
    epochs = {}
    for depth in (0, 2):
        _prefetch(monkeypatch, depth)
        set_seed(7)
        dls = dataloaders(data=digits, member=member, size=32)
        gatherers = set()
        real = DecodedSplit.batch

        def batch(self, indices, pin=False):
            gatherers.add(threading.current_thread().name)
            return real(self, indices, pin)

        monkeypatch.setattr(DecodedSplit, "batch", batch)
        epochs[depth] = [_epoch(dls.train), _epoch(dls.train), _epoch(dls.valid)]
        monkeypatch.setattr(DecodedSplit, "batch", real)
        assert gatherers == ({"MainThread"} if depth == 0 else {"ens-prefetch"})
    assert len(epochs[0][0]) > 5
    for without, with_ in zip(epochs[0], epochs[2]):
        assert len(without) == len(with_)
        for a, b in zip(without, with_):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(epochs[2][0][0][0], epochs[2][1][0][0])  # the epochs were shuffled anew
    assert _wait_no_threads() == []


def test_batches_travel_as_uint8_and_become_normalised_floats_after_the_copy(digits, monkeypatch):
    """What the loader hands to the device is the uint8 batch (a quarter of float32's bytes); the conversion and
    the augmentation run in the batch transforms, after `to_device`."""
    from pipelines.data import fastai_parts

    _prefetch(monkeypatch, 2)
    moved = []
    real = fastai_parts.to_device

    def to_device(b, device=None, non_blocking=False):
        moved.append(b[0].dtype)
        return real(b, device, non_blocking)

    monkeypatch.setattr(fastai_parts, "to_device", to_device)
    dls = dataloaders(data=digits, member=_member(), size=32)
    x, _ = next(iter(dls.train))
    assert moved == [torch.uint8] and x.dtype == torch.float32 and x.max() <= 1.0


@pytest.mark.parametrize("how", ["break", "exception", "interrupt"])
def test_the_prefetch_thread_stops_with_its_loop(digits, monkeypatch, how):
    """A loop left early (break), by an exception or by Ctrl-C (KeyboardInterrupt) stops its prefetch thread."""
    _prefetch(monkeypatch, 2)
    dls = dataloaders(data=digits, member=_member(), size=32)
    error = {"break": None, "exception": ValueError, "interrupt": KeyboardInterrupt}[how]
    with pytest.raises(error) if error else _nothing():
        for i, _ in enumerate(dls.train):
            assert prefetch_threads()  # running meanwhile
            if i == 2:
                if error:
                    raise error()
                break
    assert _wait_no_threads() == []


def test_an_error_in_the_prefetch_thread_is_raised_in_the_loop(digits, monkeypatch):
    from pipelines.data.fastai_parts import DecodedSplit

    _prefetch(monkeypatch, 2)
    dls = dataloaders(data=digits, member=_member(), size=32)
    calls, real = [], DecodedSplit.batch

    def batch(self, indices, pin=False):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("the decoded copy went away")
        return real(self, indices, pin)

    monkeypatch.setattr(DecodedSplit, "batch", batch)
    with pytest.raises(OSError, match="went away"):
        list(dls.train)
    assert _wait_no_threads() == []


def test_prefetch_alone_drops_nothing_and_stops_on_close():
    with Prefetch(iter(range(100)), depth=3) as it:
        assert list(it) == list(range(100))
    source = iter(range(10**9))  # endless: the thread would fill the queue and wait
    p = Prefetch(source, depth=2)
    it = p.__enter__()
    assert next(it) == 0
    p.close()
    assert not p.thread.is_alive()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------- reads per step
class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's value back to the host (on CUDA each is a sync), with where they
    came from. fastai's ParamScheduler is left out: it reads tensors it builds on the CPU itself (its phase
    boundaries), never a device's."""

    # reads back, and `tensor` (torch.tensor from host data: on CUDA a copy that waits for the device)
    READS = {"item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "tensor"}
    HOST_ONLY = ("fastai/callback/schedule.py",)

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            caller = traceback.extract_stack(limit=2)[0].filename.replace("\\", "/")
            if not caller.endswith(self.HOST_ONLY):
                self.calls.append((name, caller))
        return func(*args, **(kwargs or {}))


def _reads_counter():
    """A fastai callback counting `HostReads` from the third training step of each epoch on (warm) to the
    Recorder's end-of-epoch read (excluded): the whole step, callbacks and the next batch's loading included."""
    from fastai.callback.core import Callback

    class CountReads(Callback):
        order = 0  # before_batch after fastai's own set-up; after_train before the Recorder's (50) read

        def __init__(self):
            self.per_step, self.mode = [], None

        def before_batch(self):
            if self.training and self.iter >= 2:
                self._stop()
                self.mode = HostReads().__enter__()

        def after_batch(self):
            pass

        def _stop(self):
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.per_step.append(len(self.mode.calls))
                self.mode = None

        def after_train(self):
            self._stop()

        def after_fit(self):
            self._stop()

    return CountReads()


def _train(digits, member, cbs=()):
    from pipelines.train import train_member

    return train_member(member, digits, cbs=list(cbs))


@pytest.mark.slow
def test_training_steps_read_nothing_back_and_record_fastais_own_losses(digits, monkeypatch):
    """With the prefetch and the on-device records: zero reads back per warm training step (fastai's own
    Recorder reads the loss at least once per step), and the same recorded smoothed losses, epoch log and history
    as fastai's own loop without prefetch (bit for bit on the CPU)."""
    from pipelines.train import on_device

    member = _member(epochs=2)
    counters, trained = {}, {}
    for arm in ("fastai", "ens"):
        if arm == "fastai":
            monkeypatch.setattr(on_device.OnDeviceRecords, "before_fit", lambda self: None)
            _prefetch(monkeypatch, 0)
        else:
            monkeypatch.undo()
            _prefetch(monkeypatch, 2)
        counters[arm] = _reads_counter()
        trained[arm] = _train(digits, member, [counters[arm]])
    assert min(counters["fastai"].per_step) >= 1  # the old loop: a read (a sync on CUDA) every step
    assert len(counters["ens"].per_step) > 20 and set(counters["ens"].per_step) == {0}
    old, new = trained["fastai"].learn.recorder, trained["ens"].learn.recorder
    assert len(new.losses) == len(old.losses) > 0
    assert [type(v) for v in new.losses] == [type(v) for v in old.losses]
    assert all(v.device.type == "cpu" for v in new.losses)
    assert torch.allclose(torch.stack(new.losses), torch.stack(old.losses), rtol=1e-6, atol=0)
    assert trained["ens"].history == trained["fastai"].history
    assert [list(v) for v in new.values] == [list(v) for v in old.values]
    assert _wait_no_threads() == []


@pytest.mark.slow
def test_an_interrupted_fit_leaves_no_prefetch_thread(digits, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in the middle of an epoch: the fit stops and its prefetch thread with it."""
    from fastai.callback.core import Callback

    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.iter == 3:
                assert prefetch_threads()
                raise KeyboardInterrupt

    _prefetch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(digits, _member(epochs=1), [Interrupt()])
    assert _wait_no_threads() == []


@pytest.mark.parametrize("presize", [32, 80])  # 80 > 2 x 32: fastai's down-sampling hack applies
def test_the_affine_augmentation_reads_nothing_back_and_gives_fastais_pixels(presize):
    """fastai's affine augmentation (flip, rotate, zoom, warp) reads the batch's values back or copies host data to
    it 3 times per batch; ens's (`sync_free`) never (once its corner points are made) where fastai's down-sampling
    hack cannot apply, with the same pixels bit for bit."""
    from fastai.torch_core import TensorImage, set_seed
    from fastai.vision.all import aug_transforms

    from pipelines.data.fastai_parts import SyncFreeAffine, sync_free

    x = TensorImage(torch.rand(16, 3, presize, presize))
    sync_free(aug_transforms(max_warp=0.4, p_affine=1.0))[0](x, split_idx=0)  # the corner points made once
    outs, reads = {}, {}
    for free in (False, True):
        tfms = aug_transforms(size=32, max_warp=0.4, p_affine=1.0, max_rotate=20, max_zoom=1.3, max_lighting=0.3)
        tfms = sync_free(tfms) if free else tfms
        assert any(type(t) is SyncFreeAffine for t in tfms) == free
        set_seed(3)
        y = x
        with HostReads() as counter:
            for t in sorted(tfms, key=lambda t: t.order):
                y = t(y, split_idx=0)
        outs[free], reads[free] = y, counter.calls
    assert torch.equal(outs[False], outs[True])
    assert len(reads[False]) >= 2
    assert reads[True] == ([] if presize == 32 else [("item", reads[True][0][1])])
