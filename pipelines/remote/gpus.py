"""The Kaggle machines `--on kaggle[:KIND][,offline]` asks for: Kaggle's machine shape, how a unit's precision
resolves there (its keys are planned here as they will be computed there), cards, session limit, and the stated
time estimate used before any run of that kind was measured."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Gpu:
    kind: str
    machine_shape: str | None   # kernel-metadata.json's machine_shape (None: no accelerator)
    facts: dict                 # device.assumed: {"cuda", "bf16"} (T4 and P100 have no native bf16: fp16)
    cards: int
    session_hours: float        # Kaggle's limit on one session
    seconds_per_image_epoch: float  # the stated estimate at 224 px, before a run of this kind was measured

    @property
    def lanes(self) -> int:
        """Units one notebook trains at once: one per card (a notebook without a card trains one)."""
        return max(1, self.cards)


GPUS = {
    "t4x2": Gpu("t4x2", "NvidiaTeslaT4", {"cuda": True, "bf16": False}, 2, 12.0, 0.004),
    "p100": Gpu("p100", "NvidiaTeslaP100", {"cuda": True, "bf16": False}, 1, 12.0, 0.004),
    "cpu": Gpu("cpu", None, {"cuda": False, "bf16": False}, 0, 12.0, 0.05),
}


@dataclass(frozen=True)
class Target:
    gpu: Gpu
    internet: bool = True


def parse_on(text: str | None) -> Target | None:
    """`--on` → the Target, or None for this machine ('local' or nothing)."""
    if text is None or text == "local":
        return None
    place, _, rest = text.partition(":")
    if place != "kaggle":
        raise ConfigError(f"--on {text}: say `--on kaggle` (or kaggle:t4x2, kaggle:p100, kaggle:cpu; add ,offline "
                          "for a notebook with internet off)")
    words = [w for w in rest.split(",") if w] if rest else []
    internet = "offline" not in words
    kinds = [w for w in words if w != "offline"] or ["t4x2"]
    if len(kinds) != 1 or kinds[0] not in GPUS:
        raise ConfigError(f"--on {text}: the Kaggle machine is one of {', '.join(GPUS)} (default t4x2), e.g. "
                          "--on kaggle:p100")
    return Target(GPUS[kinds[0]], internet)
