"""The device a member would train on here — CUDA or not, native bf16 or not — known without importing torch
where possible: cache keys hold the resolved precision (`precision: auto` is fp32 on a CPU, bf16 or fp16 on a
card), and verbs that only read the cache must answer in well under a second.

No NVIDIA device node means no CUDA, for certain, at no cost. Where there are some, torch is asked once per boot
(and per CUDA_VISIBLE_DEVICES and torch version) and the answer memoised in ~/.cache/ens/.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

_FACTS: dict | None = None


def _torch_facts() -> dict:
    import torch

    from .memory import bf16_native

    cuda = torch.cuda.is_available()
    card = None
    if cuda:  # what a memoised memory plan is valid on (`plan.estimate.MemoryPlans`)
        card = f"{torch.cuda.get_device_name(0)} {torch.cuda.get_device_properties(0).total_memory}"
    return {"cuda": cuda, "bf16": cuda and bf16_native(), "card": card}


def _no_nvidia_device() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    if os.name != "posix" or sys.platform == "darwin":
        return sys.platform == "darwin"  # Windows: ask torch
    return not (Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*")))


def cuda_facts() -> dict:
    """{"cuda": bool, "bf16": bool, "card": the first card's name and bytes or None} for this process."""
    global _FACTS
    if _FACTS is not None:
        return _FACTS
    if "torch" in sys.modules:
        _FACTS = _torch_facts()
    elif _no_nvidia_device():
        _FACTS = {"cuda": False, "bf16": False}
    else:
        from .models import package_version
        from .util import user_cache, write_json

        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = "?"
        sig = hashlib.sha256(f"{boot}:{os.environ.get('CUDA_VISIBLE_DEVICES')}:{package_version('torch')}".encode())
        memo = user_cache() / f"device-{sig.hexdigest()[:16]}.json"
        try:
            _FACTS = json.loads(memo.read_text())
            if "card" not in _FACTS:  # written before the card was recorded
                raise ValueError("stale")
        except (OSError, ValueError):
            _FACTS = _torch_facts()
            write_json(memo, _FACTS)
    return _FACTS


def resolve_precision(requested: str, cuda: bool, bf16_supported: bool) -> str:
    """'fp32' on CPU whatever was asked (CPU autocast to half is slower and less exact); on CUDA 'auto' is bf16
    where the card computes it natively (no loss scaling needed; `bf16_supported` must mean native, as
    `memory.bf16_native` answers: emulated bf16 on a T4 or P100 is slower than fp16), else fp16."""
    if not cuda:
        return "fp32"
    if requested in ("auto", "bf16"):  # bf16 asked of a card without it: fp16 is the fast path left
        return "bf16" if bf16_supported else "fp16"
    return requested


def key_precision(requested: str) -> str:
    """The precision a member asking `requested` trains with here (what its cache key holds)."""
    facts = cuda_facts()
    return resolve_precision(requested, facts["cuda"], facts["bf16"])


@contextmanager
def assumed(facts: dict | None):
    """Within the block, keys resolve precision as on a device with `facts` ({"cuda", "bf16"}): the keys of units
    trained elsewhere (a Kaggle GPU) are planned here as they will be computed there. None: this machine's."""
    global _FACTS
    if facts is None:
        yield
        return
    saved, _FACTS = _FACTS, dict(facts)
    try:
        yield
    finally:
        _FACTS = saved
