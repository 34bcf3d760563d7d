"""The CUDA-only choices, tested as logic on a CPU-only machine with injected stand-ins for torch.cuda: what counts
as out of memory and the restart that frees the failed learner first, bf16 only where the card has it natively,
and the determinism flags per device. Nothing here trains; the `_fit` seen by `train_member` is a stub."""

import gc
import weakref
from types import SimpleNamespace

import pytest

from pipelines import train
from pipelines.config import Member
from pipelines.memory import (MemoryBudgetError, bf16_native, determinism_flags, is_out_of_memory, oom_reason,
                              plan_micro_batch, retry_on_oom)

GiB = 2**30


# --------------------------------------------------------------------------------------------- 13: out of memory
class FakeOOM(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError."""


FAKE_CUDA = SimpleNamespace(OutOfMemoryError=FakeOOM, empty_cache=lambda: None)


@pytest.mark.parametrize("exc,oom", [
    (FakeOOM("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("Exception occured in `MixedPrecision` when calling event `before_step`:\n\tCUDA error: "
                  "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),  # fastai's rewording
    (RuntimeError("CUDA error: device-side assert triggered"), False),
    (RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"), False),
    (ValueError("CUBLAS_STATUS_ALLOC_FAILED"), False),  # only RuntimeErrors come from the CUDA libraries
    (MemoryError(), False),  # host memory: halving the micro-batch is no cure
])
def test_what_counts_as_out_of_memory(exc, oom):
    assert is_out_of_memory(exc, cuda=FAKE_CUDA) is oom


def test_real_torch_out_of_memory_error_counts():
    import torch

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))


class FakeLearner:
    """Holds "GPU memory" and sits in a reference cycle, as a fastai Learner does (its callbacks point back)."""

    def __init__(self):
        self.cbs = [SimpleNamespace(learn=self)]


def failing_fit(refs, error):
    """A `_fit` whose learner is alive in its frame when it raises (the traceback keeps that frame)."""
    learn = FakeLearner()
    refs.append(weakref.ref(learn))
    raise error


@pytest.fixture
def no_auto_gc():
    """Automatic collection off, so that only the code under test can have freed a cycle."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_retry_frees_the_failed_attempt_before_the_next(no_auto_gc):
    refs, events = [], []
    cuda = SimpleNamespace(OutOfMemoryError=FakeOOM,
                           empty_cache=lambda: events.append(("empty_cache", refs[-1]() is None)))

    def attempt(plan):
        events.append(("attempt", plan.micro_batch, bool(refs) and refs[-1]() is None))
        if plan.micro_batch > 16:
            failing_fit(refs, RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
        return "trained"

    restarts = []
    plan = plan_micro_batch(64, lambda mb: mb, GiB, member="m")
    assert retry_on_oom(attempt, plan, lambda p, why: restarts.append((p.micro_batch, why)), cuda=cuda) == "trained"
    # each failed learner was dead before the cache was emptied, and before the next attempt built another
    assert events == [("attempt", 64, False), ("empty_cache", True), ("attempt", 32, True), ("empty_cache", True),
                      ("attempt", 16, True)]
    assert [mb for mb, _ in restarts] == [32, 16] and "CUBLAS_STATUS_ALLOC_FAILED" in restarts[0][1]


def test_the_restart_records_the_line_that_says_out_of_memory():
    wrapped = RuntimeError("Exception occured in `MixedPrecision` when calling event `before_step`:\n\t"
                           "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert oom_reason(wrapped) == ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                   "`cublasCreate(handle)`")
    assert oom_reason(FakeOOM("CUDA out of memory. " + "x" * 500)).endswith("…")
    assert len(oom_reason(FakeOOM("CUDA out of memory. " + "x" * 500))) == 200


def test_retry_reraises_what_is_not_out_of_memory_and_stops_at_one():
    with pytest.raises(ValueError):
        retry_on_oom(lambda p: (_ for _ in ()).throw(ValueError("bad")), plan_micro_batch(4, lambda mb: mb, GiB),
                     cuda=FAKE_CUDA)
    with pytest.raises(FakeOOM):  # on the CPU (no plan) nothing is retried
        retry_on_oom(lambda p: (_ for _ in ()).throw(FakeOOM("oom")), None, cuda=FAKE_CUDA)
    plan = plan_micro_batch(4, lambda mb: mb, GiB, member="m", size=32)
    with pytest.raises(MemoryBudgetError, match="micro-batch of 1 .*CUDNN_STATUS_ALLOC_FAILED"):
        retry_on_oom(lambda p: (_ for _ in ()).throw(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")), plan,
                     cuda=FAKE_CUDA)


@pytest.fixture
def restore_backends():
    """train_member and seed_run set process-wide torch flags: put them back."""
    import torch

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


@pytest.mark.parametrize("error", ["cublas", "torch_oom"])
def test_train_member_restarts_after_oom_without_the_failed_learner(monkeypatch, capsys, no_auto_gc,
                                                                    restore_backends, error):
    """train_member's retry loop with a stub `_fit` (no GPU here): a cuBLAS allocation failure counts as out of
    memory, and the failed learner (alive in the raising frame, in a cycle) is gone before the restart."""
    import torch

    errors = {"cublas": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"),
              "torch_oom": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")}
    refs, calls = [], []

    def fake_fit(member, data, progress, checkpoint_dir, cbs, device, precision, plan):
        calls.append((plan.micro_batch, [r() is None for r in refs]))
        if len(calls) == 1:
            failing_fit(refs, errors[error]())  # made here: nothing else holds it
        return train.Trained(learn=None, device=device, precision=precision, memory=plan.as_meta())

    monkeypatch.setattr(train, "_fit", fake_fit)
    monkeypatch.setattr(train, "device_precision", lambda requested: ("cuda", "fp16"))
    monkeypatch.setattr(train, "memory_plan",
                        lambda member, data, device, precision: plan_micro_batch(64, lambda mb: mb, GiB, member="m"))
    trained = train.train_member(Member(name="m", arch="test_resnet"), data=None)
    assert calls == [(64, []), (32, [True])]
    assert trained.memory["oom_restarts"] == 1 and trained.memory["micro_batch"] == 32
    assert "CUDA" in trained.memory["oom_errors"][0]
    assert "out of memory" in capsys.readouterr().err


def test_train_member_restart_leaves_the_autocast_the_failed_forward_entered(monkeypatch, restore_backends):
    """fastai's MixedPrecision enters autocast in before_batch and leaves it in after_loss: an OOM in the forward
    leaves it entered, and torch then reuses stale half-precision copies of the weights after every step (shown
    here on the CPU's autocast, the same mechanism as CUDA's). The restart must start from a clean autocast."""
    import torch

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    seen = []

    def fake_fit(member, data, progress, checkpoint_dir, cbs, device, precision, plan):
        if not seen:
            seen.append("failed")
            torch.autocast("cpu", dtype=torch.bfloat16).__enter__()  # as MixedPrecision.before_batch
            lin(x)  # the forward, then out of memory before after_loss
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        seen.append(torch.is_autocast_enabled("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a training step
            before = lin(x)
        with torch.no_grad():
            lin.weight.mul_(0)  # the optimizer moves the weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            after = lin(x)
        seen.append(torch.equal(before, after))
        return train.Trained(learn=None, device=device)

    monkeypatch.setattr(train, "_fit", fake_fit)
    monkeypatch.setattr(train, "device_precision", lambda requested: ("cuda", "bf16"))
    monkeypatch.setattr(train, "memory_plan",
                        lambda member, data, device, precision: plan_micro_batch(8, lambda mb: mb, GiB, member="m"))
    try:
        train.train_member(Member(name="m", arch="test_resnet"), data=None)
        assert seen == ["failed", False, False]  # autocast off, and the new weights were used
    finally:
        from pipelines.memory import reset_autocast

        reset_autocast()  # whatever happened, leave no autocast on for the other tests


# --------------------------------------------------------------------------------------------- the member's cap
@pytest.mark.parametrize("fails", [False, True], ids=["fit", "failed-fit"])
def test_train_member_holds_the_budget_cap_for_its_fit_only(monkeypatch, restore_backends, fails):
    """The process's memory cap is the member's budget while it plans and trains, and what it was before once the
    fit ends, however it ends (`ens tune`, Ray workers and benchmarks train several members in one process).
    torch.cuda's cap functions are stand-ins here: no card."""
    import torch

    caps = [0.9]  # the process's cap before the member (an earlier one's, or the user's)
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=16 * GiB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: caps[-1], raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: caps.append(f))

    def fake_fit(member, data, progress, checkpoint_dir, cbs, device, precision, plan):
        seen["fit"] = caps[-1]
        if fails:
            raise ValueError("a fit that failed")
        return train.Trained(learn=None, device=device)

    monkeypatch.setattr(train, "_fit", fake_fit)
    monkeypatch.setattr(train, "device_precision", lambda requested: ("cuda", "fp16"))
    monkeypatch.setattr(train, "memory_plan", lambda *a: seen.setdefault("plan", caps[-1]) and None)
    member = Member(name="m", arch="test_resnet", gpu_memory="4GiB")
    if fails:
        with pytest.raises(ValueError, match="a fit that failed"):
            train.train_member(member, data=None)
    else:
        train.train_member(member, data=None)
    assert seen == {"plan": 0.25, "fit": 0.25}  # 4 GiB of a 16 GiB card while planning and training
    assert caps[-1] == 0.9  # and the previous cap back after


# --------------------------------------------------------------------------------------------- 15: bf16
def fake_cuda(capability, emulates=True, has_argument=True, available=True):
    """torch.cuda's bf16 query: `is_bf16_supported()` answers True on pre-Ampere cards that emulate bf16."""
    def with_argument(including_emulation=True):
        return capability >= (8, 0) or (including_emulation and emulates)

    def without_argument():  # an older torch
        return capability >= (8, 0) or emulates

    return SimpleNamespace(is_available=lambda: available, get_device_capability=lambda device=None: capability,
                           is_bf16_supported=with_argument if has_argument else without_argument)


@pytest.mark.parametrize("capability,native", [((6, 0), False), ((7, 0), False), ((7, 5), False), ((8, 0), True),
                                               ((8, 6), True), ((8, 9), True), ((9, 0), True)])
@pytest.mark.parametrize("has_argument", [True, False])
def test_bf16_only_where_the_card_has_it(capability, native, has_argument):
    # P100 (6.0), V100 (7.0), T4 and RTX 20xx (7.5) emulate bf16, slower than fp16; A100 (8.0) and later have it
    assert bf16_native(fake_cuda(capability, has_argument=has_argument)) is native
    assert bf16_native(fake_cuda(capability, available=False)) is False


def test_auto_precision_is_fp16_on_a_t4(monkeypatch):
    import torch

    for capability, expected in [((7, 5), "fp16"), ((8, 6), "bf16")]:
        fake = fake_cuda(capability)
        monkeypatch.setattr(torch.cuda, "is_available", fake.is_available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake.is_bf16_supported)
        monkeypatch.setattr(torch.cuda, "get_device_capability", fake.get_device_capability)
        assert train.device_precision("auto") == ("cuda", expected)
        assert train.device_precision("bf16") == ("cuda", expected)
        assert train.device_precision("fp32") == ("cuda", "fp32")


# --------------------------------------------------------------------------------------------- 16: determinism
@pytest.mark.parametrize("device,deterministic,benchmark,cudnn_det,algorithms", [
    ("cuda", None, True, False, False),  # the default on a GPU: fast (cudnn.benchmark), not bit-exact
    ("cuda", False, True, False, False),
    ("cuda", True, False, True, True),
    ("cpu", None, False, True, False),  # the default on the CPU: deterministic, as before
    ("cpu", True, False, True, False),  # CPU kernels are deterministic already: no NaN-filling of empty tensors
    ("cpu", False, False, False, False),
])
def test_determinism_flags(restore_backends, device, deterministic, benchmark, cudnn_det, algorithms):
    import torch

    flags = determinism_flags(deterministic, device)
    assert flags == {"deterministic": cudnn_det, "cudnn_benchmark": benchmark, "cudnn_deterministic": cudnn_det,
                     "deterministic_algorithms": algorithms}
    # the real flags after seeding a run, starting from the opposite settings (they are process-wide)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not benchmark, not cudnn_det
    torch.use_deterministic_algorithms(not algorithms)
    member = Member(name="m", arch="test_resnet", seed=7, deterministic=deterministic)
    assert train.seed_run(member, device) is cudnn_det
    assert torch.backends.cudnn.benchmark is benchmark
    assert torch.backends.cudnn.deterministic is cudnn_det
    assert torch.are_deterministic_algorithms_enabled() is algorithms
    first = torch.rand(3)
    train.seed_run(member, device)
    assert torch.equal(torch.rand(3), first)  # and seeded


def test_deterministic_is_a_member_field_outside_the_cache_key():
    from pipelines.cache import member_key

    plain = Member(name="m", arch="test_resnet")
    assert plain.deterministic is None and "deterministic" in Member.RUN_ONLY
    exact = Member(name="m", arch="test_resnet", deterministic=True)
    assert member_key(plain, "fp") == member_key(exact, "fp")


def test_train_member_reports_the_determinism_it_ran_with(monkeypatch, restore_backends):
    monkeypatch.setattr(train, "_fit", lambda member, data, progress, checkpoint_dir, cbs, device, precision, plan:
                        train.Trained(learn=None, device=device))
    monkeypatch.setattr(train, "device_precision", lambda requested: ("cuda", "fp16"))
    monkeypatch.setattr(train, "memory_plan", lambda *a: None)
    assert train.train_member(Member(name="m", arch="a"), data=None).deterministic is False
    assert train.train_member(Member(name="m", arch="a", deterministic=True), data=None).deterministic is True
