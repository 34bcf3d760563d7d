"""Fitting a member into a GPU memory budget, as pure logic: the micro-batch search with injected probes, the OOM
restart rule, and the CUDA probe's bookkeeping run on CPU with a fake `torch.cuda` (nothing is trained)."""

import json
import math
from types import SimpleNamespace

import pytest

from pipelines.config import Member
from pipelines.errors import EnsError
from pipelines.memory import (SAFETY_MARGIN, MemoryBudgetError, candidates, cuda_probe, halve_on_oom,
                              plan_member, plan_micro_batch, probe_optimizer, probe_size)

GiB = 2**30


def optimizer_state_bytes(model) -> int:
    """What fastai's Adam keeps once it has stepped: two running averages (grad_avg, sqr_avg) per trainable
    parameter, in the parameters' dtype (the probe measures a real step; this is the expectation)."""
    return 2 * sum(p.numel() * p.element_size() for p in model.parameters())


def threshold(limit, per_image=1000):
    """A probe that runs out of memory above `limit` images and otherwise peaks at `per_image` bytes per image."""
    return lambda mb: mb * per_image if mb <= limit else None


@pytest.mark.parametrize("effective,limit,micro,steps", [
    (64, 64, 64, 1), (64, 63, 32, 2), (64, 5, 4, 16), (64, 1, 1, 64),
    (96, 20, 16, 6), (96, 47, 32, 3), (48, 13, 12, 4), (100, 30, 25, 4), (100, 99, 50, 2),
    (1000, 333, 250, 4), (1, 1, 1, 1), (6, 5, 3, 2),
])
def test_search_finds_largest_dividing_micro_batch(effective, limit, micro, steps):
    plan = plan_micro_batch(effective, threshold(limit), 10 * GiB)
    assert (plan.micro_batch, plan.accumulation_steps) == (micro, steps)
    assert plan.divides and plan.samples_per_step == effective
    assert plan.n_acc == effective  # fastai's GradientAccumulation counts samples
    assert plan.peak_bytes == micro * 1000
    assert plan.probes[-1][0] == micro or (micro, micro * 1000) in plan.probes


def test_prime_effective_batch_uses_a_near_split_not_one():
    # 97 is prime: exact accumulation would mean micro-batches of 1; 49 × 2 = 98 samples per step instead
    plan = plan_micro_batch(97, threshold(60), 10 * GiB)
    assert (plan.micro_batch, plan.accumulation_steps, plan.samples_per_step, plan.divides) == (49, 2, 98, False)
    plan = plan_micro_batch(97, threshold(48), 10 * GiB)
    assert (plan.micro_batch, plan.accumulation_steps, plan.samples_per_step) == (33, 3, 99)


def test_search_exhaustively_on_small_batches():
    """Every effective batch up to 130 and every limit: the largest candidate that fits, found in O(log B) probes,
    never probing one size twice, never more than a factor 4 below the unconstrained best (2 for exactness)."""
    for effective in range(1, 131):
        cands = candidates(effective)
        assert cands[0] == 1 and cands[-1] == effective
        for limit in range(1, effective + 1):
            plan = plan_micro_batch(effective, threshold(limit), 10 * GiB)
            assert plan.micro_batch == max(c for c in cands if c <= limit)
            tried = [mb for mb, _ in plan.probes]
            assert len(tried) == len(set(tried))
            assert len(tried) <= 2 * math.ceil(math.log2(effective)) + 2, (effective, limit, tried)
            assert plan.micro_batch * 4 > limit
            largest_divisor = max(d for d in range(1, limit + 1) if effective % d == 0)
            assert plan.micro_batch >= largest_divisor
            assert plan.samples_per_step - effective < plan.accumulation_steps


@pytest.mark.parametrize("effective", [64, 256, 1024])
def test_power_of_two_batches_take_at_most_log2_plus_one_probes(effective):
    for limit in range(1, effective + 1, 7):
        plan = plan_micro_batch(effective, threshold(limit), 10 * GiB)
        assert len(plan.probes) <= int(math.log2(effective)) + 1


def test_a_peak_above_the_budget_does_not_fit():
    # a probe on a card larger than the budget never runs out of memory: its peak decides
    plan = plan_micro_batch(64, lambda mb: mb * 1000, budget_bytes=20_500)
    assert plan.micro_batch == 16 and plan.peak_bytes == 16_000
    assert (32, 32_000) in plan.probes and (64, 64_000) in plan.probes


def test_nothing_fits():
    with pytest.raises(MemoryBudgetError) as e:
        plan_micro_batch(64, threshold(0), 8 * GiB, member="vit", size=(384, 384))
    msg = str(e.value)
    assert isinstance(e.value, EnsError) and "\n" not in msg
    assert "vit" in msg and "384x384" in msg and "8.00 GiB" in msg and "gpu_memory" in msg
    assert "out of memory" in msg and "lower its size" in msg
    with pytest.raises(MemoryBudgetError, match="peak 3.00 GiB"):  # fits the card, not the budget
        plan_micro_batch(3, lambda mb: mb * 3 * GiB, 2 * GiB, member="vit", size=224)


def test_probes_are_recorded_for_the_cache_metadata():
    plan = plan_micro_batch(64, threshold(20), 10 * GiB, member="m", size=(32, 32))
    assert plan.probes == ((64, None), (32, None), (16, 16000))
    meta = json.loads(json.dumps(plan.as_meta()))
    assert meta["micro_batch"] == 16 and meta["accumulation_steps"] == 4 and meta["n_acc"] == 64
    assert meta["probes"] == [[64, None], [32, None], [16, 16000]]
    assert plan.describe() == "16 × 4, approximate"  # BatchNorm (assumed unless known otherwise)


def test_halve_on_oom():
    plan = plan_micro_batch(64, threshold(16), 10 * GiB, member="vit", size=224)
    smaller = halve_on_oom(plan)
    assert (smaller.micro_batch, smaller.accumulation_steps, smaller.n_acc) == (8, 8, 64)
    assert smaller.peak_bytes is None and smaller.oom_restarts == 1
    assert halve_on_oom(smaller).oom_restarts == 2
    odd = halve_on_oom(plan_micro_batch(100, threshold(30), 10 * GiB))  # 25 → 10, the largest divisor ≤ 12
    assert (odd.micro_batch, odd.accumulation_steps, odd.divides) == (10, 10, True)
    one = plan_micro_batch(64, threshold(1), 10 * GiB, member="vit", size=224)
    with pytest.raises(MemoryBudgetError, match=r"member vit: ran out of memory at a micro-batch of 1 at size 224"):
        halve_on_oom(one)


def test_gradient_accumulation_callback_counts_samples():
    from fastai.callback.training import GradientAccumulation

    assert plan_micro_batch(64, threshold(64), GiB).callbacks() == []
    (cb,) = plan_micro_batch(64, threshold(16), GiB).callbacks()
    assert isinstance(cb, GradientAccumulation) and cb.n_acc == 64


def test_probe_size_is_the_largest_stage():
    m = Member(name="m", arch="test_resnet", stages=[[128, 2], [[160, 96], 1], [144, 1]])
    assert probe_size(m) == (144, 144)
    assert probe_size(Member(name="m", arch="a", size=[100, 300])) == (100, 300)


# --------------------------------------------------------------------------------------------- the probe, on CPU
MiB = 2**20


class FakeCuda:
    """torch.cuda's memory API for a CPU run. A forward hook pretends each image's activations take `per_image`
    bytes (allocated) and `frag` times that in reserved memory (the caching allocator's blocks), and raises
    out-of-memory above `limit` images; `resident` bytes (the weights) stay reserved. `spy` wraps the probe's
    optimizer so that what its step() really allocated (its moments) is reserved as well. `mem_get_info` answers
    `free` bytes of a `total`-byte card."""

    class OutOfMemoryError(RuntimeError):
        pass

    def __init__(self, limit, per_image=10_000, total=16 * GiB, resident=0, frag=1.25, free=None, error=None):
        self.limit, self.per_image, self.total, self.resident, self.frag = limit, per_image, total, resident, frag
        self.free = total - resident if free is None else free
        self.error = error or self.OutOfMemoryError("CUDA out of memory (fake)")
        self.peak = self.peak_reserved = self.state = self.activations = 0
        self.calls, self.fractions, self.steps = [], [], 0

    def touch(self):
        self.peak = max(self.peak, self.activations)
        self.peak_reserved = max(self.peak_reserved, self.resident + self.state + int(self.activations * self.frag))

    def hook(self, module, args):
        mb = args[0].shape[0]
        if mb > self.limit:
            raise self.error
        self.activations = mb * self.per_image
        self.touch()

    def spy(self, params):
        """The probe's own optimizer (fastai's Adam), reporting the state its step() really allocated."""
        import torch

        opt = probe_optimizer(params)
        step = opt.step

        def counted_step():
            step()
            self.steps += 1
            self.state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                             if torch.is_tensor(v))
            self.touch()

        opt.step = counted_step
        return opt

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.state = self.activations = 0  # the probe's optimizer and tensors are gone: their blocks go back

    def reset_peak_memory_stats(self):
        self.calls.append("reset")
        self.peak, self.peak_reserved = 0, self.resident

    def max_memory_allocated(self):
        return self.peak

    def max_memory_reserved(self):
        return self.peak_reserved

    def memory_reserved(self):
        return self.resident

    def mem_get_info(self):
        return self.free, self.total

    def get_device_properties(self, index):
        return SimpleNamespace(total_memory=self.total)

    def set_per_process_memory_fraction(self, fraction):
        self.fractions.append(fraction)

    def get_per_process_memory_fraction(self):
        return self.fractions[-1] if self.fractions else 1.0

    def is_available(self):
        return True


def small_net():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(4, 5))


def test_cuda_probe_logic_on_cpu():
    import torch

    net = small_net()
    fake = FakeCuda(limit=12)
    net.register_forward_pre_hook(fake.hook)
    net[0].weight.requires_grad_(False)  # a frozen body: the probe unfreezes it, then restores the flag
    net.eval()
    bn_before = net[1].running_mean.clone()
    weights_before = [p.detach().clone() for p in net.parameters()]
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)

    fits = cuda_probe(lambda: net, (16, 16), 4 * GiB, "fp32", cuda=fake, device="cpu", optimizer=fake.spy)
    moments = optimizer_state_bytes(net)  # fastai's Adam: grad_avg and sqr_avg, fp32, for every parameter
    assert moments == 2 * 4 * sum(p.numel() for p in net.parameters())
    # reserved, not allocated: the activations' blocks (× 1.25 here) and the moments a real step() allocated
    assert fits(8) == int(8 * 10_000 * 1.25) + moments
    assert fake.steps == 2  # two steps: the second forward and backward run with the first step's moments alive
    assert fake.fractions == [0.25]  # capped once, at budget / card
    assert fits(64) is None  # out of memory: caught
    assert fake.calls[-1] == "empty_cache"
    assert fits(4) == int(4 * 10_000 * 1.25) + moments  # the peak is reset before each probe

    # the model is left as found: weights, flags, mode, BatchNorm statistics, gradients, the random generators
    assert all(torch.equal(a, b) for a, b in zip(weights_before, net.parameters()))
    assert net[0].weight.requires_grad is False and net[6].weight.requires_grad is True
    assert not net.training
    assert torch.equal(net[1].running_mean, bn_before)
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.rand(3), expected_next)

    plan = plan_micro_batch(64, fits, 4 * GiB, member="m", size=(16, 16))
    assert (plan.micro_batch, plan.accumulation_steps) == (8, 8)  # 12 is no divisor of 64; 8 is


def test_probe_optimizer_is_fastais_adam_and_leaves_the_weights():
    import torch
    from fastai.optimizer import Optimizer

    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = probe_optimizer(list(net.parameters()))
    assert isinstance(opt, Optimizer)  # what a fastai Learner creates (opt_func=Adam)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert sum(v.numel() * v.element_size() for v in state) == optimizer_state_bytes(net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # lr 0: the step moves nothing


def test_cuda_probe_counts_a_cublas_allocation_failure_as_out_of_memory():
    net = small_net()
    fake = FakeCuda(limit=4, error=RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"))
    net.register_forward_pre_hook(fake.hook)
    fits = cuda_probe(net, 16, GiB, "fp32", cuda=fake, device="cpu", limit_memory=False, optimizer=fake.spy)
    assert fits(8) is None and fits(4) is not None
    fake.error = RuntimeError("CUDA error: device-side assert triggered")
    with pytest.raises(RuntimeError, match="device-side assert"):
        fits(16)


def test_plan_applies_free_memory_and_the_safety_margin():
    """The usable limit is min(budget, what the card has free + what this process holds) − SAFETY_MARGIN, and the
    probe's peak RESERVED memory (optimizer step included) must stay under it."""
    from functools import partial

    assert SAFETY_MARGIN == 512 * MiB
    m = Member(name="m", arch="a", size=8, batch_size=64, gpu_memory="2GiB", min_micro_batch=2)
    per_image, resident = 40 * MiB, 100 * MiB  # 50 MiB reserved per image, with the fake's fragmentation

    def plan(free):
        net = small_net()
        fake = FakeCuda(limit=10_000, per_image=per_image, resident=resident, free=free)
        net.register_forward_pre_hook(fake.hook)
        return plan_member(m, lambda: net, "fp32", probe=partial(cuda_probe, cuda=fake, device="cpu",
                                                                 optimizer=fake.spy))

    roomy = plan(free=20 * GiB)  # a big card: the budget binds; 2 GiB − 512 MiB − 100 MiB leaves 28 images → 16
    assert roomy.micro_batch == 16 and roomy.limit_bytes == 2 * GiB - SAFETY_MARGIN
    assert roomy.budget_bytes == 2 * GiB and roomy.as_meta()["limit_bytes"] == 2 * GiB - SAFETY_MARGIN
    busy = plan(free=1 * GiB)  # another process holds most of it: 1 GiB + 100 MiB − 512 MiB leaves 12 images → 8
    assert busy.micro_batch == 8 and busy.limit_bytes == GiB + resident - SAFETY_MARGIN
    assert all(peak is None or peak > busy.limit_bytes for mb, peak in busy.probes if mb > 8)
    with pytest.raises(MemoryBudgetError, match=r"does not fit gpu_memory 2.00 GiB \(0.04 GiB usable"):
        plan(free=SAFETY_MARGIN + 40 * MiB - resident)  # 40 MiB usable: less than the weights


def test_the_default_budget_is_what_an_8gb_card_offers():
    assert Member(name="m", arch="a").gpu_memory == "7GiB"


def test_cuda_probe_takes_a_learner_and_autocast_precision():
    import torch

    net = small_net()
    fake = FakeCuda(limit=100)
    net.register_forward_pre_hook(fake.hook)
    learner = SimpleNamespace(model=net)  # anything with a .model, as a fastai Learner
    fits = cuda_probe(learner, 16, GiB, "bf16", cuda=fake, device="cpu", limit_memory=False, optimizer=fake.spy)
    assert fits(4) == int(40_000 * 1.25) + optimizer_state_bytes(net)
    assert fake.fractions == []
    assert next(net.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_plan_member_uses_budget_and_largest_stage():
    seen = {}

    def probe(model, size, budget, precision):
        seen.update(size=size, budget=budget, precision=precision, model=model)
        return threshold(24)

    m = Member(name="vit", arch="test_vit", stages=[[16, 1], [48, 1]], batch_size=96, gpu_memory="6GiB")
    plan = plan_member(m, "factory", "bf16", probe=probe)
    assert seen == {"size": (48, 48), "budget": 6 * GiB, "precision": "bf16", "model": "factory"}
    assert (plan.micro_batch, plan.accumulation_steps, plan.member, plan.size) == (24, 4, "vit", (48, 48))
    with pytest.raises(MemoryBudgetError, match="member vit: .* at size 48x48 does not fit gpu_memory 6.00 GiB"):
        plan_member(m, "factory", "bf16", probe=lambda *a: threshold(0))


# --------------------------------------------------------------------------------------------- the process's cap
def test_a_probe_puts_the_previous_memory_cap_back_when_planning_is_done():
    """The cap a member's budget sets must not outlive it: `ens plan` probes member after member, `ens tune` and Ray
    workers train one member after another in one process."""
    from functools import partial

    net = small_net()
    fake = FakeCuda(limit=10_000)
    net.register_forward_pre_hook(fake.hook)
    fake.set_per_process_memory_fraction(0.5)  # what the process had before (an earlier member, or the user)
    m = Member(name="m", arch="a", size=8, batch_size=64, gpu_memory="4GiB")
    plan_member(m, lambda: net, "fp32", probe=partial(cuda_probe, cuda=fake, device="cpu", optimizer=fake.spy))
    assert fake.fractions == [0.5, 0.25, 0.5]  # capped at budget / card while probing, then as it was


def test_memory_cap_is_restored_however_the_block_ends():
    from pipelines.memory import memory_cap

    fake = FakeCuda(limit=1)
    with memory_cap(8 * GiB, fake):
        assert fake.get_per_process_memory_fraction() == 0.5
    assert fake.fractions == [0.5, 1.0]  # torch's default, uncapped, is back
    with pytest.raises(KeyError), memory_cap(4 * GiB, fake):
        raise KeyError("a fit that failed")
    assert fake.get_per_process_memory_fraction() == 1.0
    no_card = SimpleNamespace(is_available=lambda: False)  # the CPU: nothing to cap, nothing called
    with memory_cap(GiB, no_card):
        pass


# --------------------------------------------------------------------------------------------- the smallest micro-batch
def bn_free_net():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


@pytest.mark.parametrize("net,allowed,fits_images,micro", [
    (small_net, None, 8, None),  # BatchNorm: 16 at the least; 8 would fit, and is refused
    (small_net, 4, 8, 8),  # the member allows down to 4
    (small_net, None, 16, 16),
    (bn_free_net, None, 2, 2),  # no BatchNorm: 2 at the least
    (bn_free_net, None, 1, None),  # 1 is never a micro-batch (BatchNorm in any fastai head would crash on it)
])
def test_the_smallest_micro_batch_is_a_budget_error_not_a_silent_one(net, allowed, fits_images, micro):
    from functools import partial

    model, tried = net(), []
    fake = FakeCuda(limit=fits_images)
    model.register_forward_pre_hook(lambda module, args: tried.append(args[0].shape[0]))
    model.register_forward_pre_hook(fake.hook)
    m = Member(name="m", arch="a", size=8, batch_size=64, **({} if allowed is None else {"min_micro_batch": allowed}))
    plan = lambda: plan_member(m, lambda: model, "fp32",  # noqa: E731
                               probe=partial(cuda_probe, cuda=fake, device="cpu", optimizer=fake.spy))
    if micro is None:
        with pytest.raises(MemoryBudgetError, match="even a micro-batch of (16|2) at size 8x8 does not fit"):
            plan()
        assert min(tried) >= 2  # never probed (nor trained) at 1
    else:
        assert plan().micro_batch == micro


def test_halving_after_out_of_memory_stops_at_the_smallest_micro_batch():
    plan = plan_micro_batch(64, threshold(32), 10 * GiB, member="vit", size=224, min_micro=16)
    assert halve_on_oom(plan).micro_batch == 16
    with pytest.raises(MemoryBudgetError, match="ran out of memory at a micro-batch of 16 .* min_micro_batch below 16"):
        halve_on_oom(halve_on_oom(plan))
    assert plan_micro_batch(8, threshold(8), GiB, min_micro=16).micro_batch == 8  # a batch below the floor is whole


def test_the_meta_and_the_plan_say_micro_batch_times_steps_and_that_it_is_approximate():
    with_bn = plan_micro_batch(64, threshold(16), GiB, min_micro=16)
    meta = with_bn.as_meta()
    assert (meta["accumulation"], meta["approximate"], meta["min_micro_batch"]) == ("16 × 4", True, 16)
    assert "exact" not in meta and with_bn.describe() == "16 × 4, approximate"
    without_bn = plan_micro_batch(64, threshold(16), GiB, batchnorm=False)
    assert not without_bn.approximate and without_bn.describe() == "16 × 4"  # the full batch's mean gradient
    whole = plan_micro_batch(64, threshold(64), GiB).as_meta()
    assert (whole["accumulation"], whole["approximate"]) == ("64 × 1", False)
