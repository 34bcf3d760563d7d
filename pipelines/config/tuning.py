"""A member's `tune:` block: the Optuna search space and which member fields it may vary."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from .base import Strict


class TuneRange(Strict):
    """A numeric search range: integers when low and high (and step) are integers, else floats."""

    low: Union[int, float]
    high: Union[int, float]
    log: bool = False  # sample on a log scale (needs low > 0)
    step: Union[int, float, None] = None  # a grid step (not with log)

    @model_validator(mode="after")
    def _sound(self):
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.step is not None:
            raise ValueError("log and step do not combine; drop one")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be positive (got {self.step})")
        return self

    @property
    def is_int(self) -> bool:
        ints = [v for v in (self.low, self.high, self.step) if v is not None]
        return all(isinstance(v, int) and not isinstance(v, bool) for v in ints)


class Tune(Strict):
    """`ens tune`'s search: `trials` trials of `epochs` epochs on a stratified `fraction` of the training images
    (the validation images stay the competition's); `space` maps member field paths (`lr`,
    `aug_transforms.max_rotate`) to a list of choices or a {low, high, log?, step?} range."""

    trials: int = Field(10, ge=1)
    epochs: int = Field(2, ge=1)
    fraction: float = Field(0.25, gt=0, le=1)
    pruner: Literal["median", "asha", "none"] = "median"  # stop trailing trials: below the median of earlier ones at the same epoch, or successive halving
    space: dict[str, Union[TuneRange, list[Any]]] = Field(min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _entries(cls, v):
        if not isinstance(v, dict):
            return v  # pydantic says what is wrong
        out = {}
        for key, spec in v.items():
            if isinstance(spec, list) and spec:
                out[key] = spec
            elif isinstance(spec, dict):
                try:
                    out[key] = TuneRange.model_validate(spec)
                except ValidationError as e:
                    first = e.errors()[0]
                    problem = (f"unknown key '{first['loc'][0]}' (a range takes low, high, log, step)"
                               if first["type"] == "extra_forbidden" else
                               f"{'.'.join(map(str, first['loc']))} {first['msg']}".strip().removeprefix("Value error, "))
                    raise ValueError(f"space key '{key}': {problem}") from None
            else:
                raise ValueError(f"space key '{key}': give a list of choices or a range {{low, high, log?, step?}}, "
                                 f"not {spec!r}")
        return out


# member fields a search may not vary: trials set epochs (and drop stages) themselves; the rest change no result
