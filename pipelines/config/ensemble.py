"""An ensemble's YAML: its members, validation (holdout or cv), refit and how the members are combined."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Strict
from .member import Member


COMBINE_METHODS = ("mean", "greedy", "hill_climb", "rank", "power", "stack", "subset")
LEARNED = ("greedy", "hill_climb", "stack", "subset")  # blends whose weights are learned from the validation probabilities
MAX_SUBSET_MEMBERS = 12  # `subset` scores all 2^m subsets: 4095 at 12 members


class Combine(Strict):
    """How the members' probabilities become one: fixed blends (`mean` with the members' weights, `rank`, `power`)
    or learned ones (`greedy` selection with replacement, `hill_climb` with negative weights, `stack`: a logistic
    regression on the members' log-probabilities, `subset`: the best subset's weighted mean), learned on the
    validation (or out-of-fold) rows and scored by nested cross-validation."""

    method: Literal[COMBINE_METHODS] = "mean"
    power: float = Field(2.0, gt=0)  # power averaging's exponent
    rounds: int = Field(100, ge=1)  # greedy selection's and hill climbing's rounds
    allow_negative: bool = True  # hill climbing may subtract a member
    C: float = Field(1.0, gt=0)  # stacking's inverse L2 strength

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v):
        return {"method": v} if isinstance(v, str) else v

    @property
    def learned(self) -> bool:
        return self.method in LEARNED


class Ensemble(Strict):
    competition: str
    description: str = ""
    probs: Literal["tta", "plain"] = "tta"  # which probabilities are averaged
    # holdout: every member trains once, validated on the competition's split; cv: one model per fold of the
    # competition's `cv`, the blend chosen and scored on the out-of-fold probabilities of every training image
    validation: Literal["holdout", "cv"] = "holdout"
    # cv only: the test predictions from the mean of the fold models (none), or from one more model per member
    # trained on every training image (full)
    refit: Literal["none", "full"] = "none"
    combine: Combine = Combine()
    # mlflow: each `ens run` an MLflow run (params, metrics per epoch and member, the blend's score, the CSV);
    # needs ens[mlflow]; `ens run --track` does the same for one run
    tracking: Literal["none", "mlflow"] = "none"
    defaults: dict[str, Any] = {}
    members: list[Member] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self):
        seen = set()
        for m in self.members:
            if m.name in seen:
                raise ValueError(f"member name '{m.name}' is used twice; give each member its own name")
            seen.add(m.name)
        return self

    @model_validator(mode="after")
    def _subset_of_few(self):
        if self.combine.method == "subset" and len(self.members) > MAX_SUBSET_MEMBERS:
            raise ValueError(f"combine: subset scores every subset of the members: at most {MAX_SUBSET_MEMBERS} "
                             f"members, not {len(self.members)}; use greedy")
        return self

    @model_validator(mode="after")
    def _refit_needs_folds(self):
        if self.refit != "none" and self.validation != "cv":
            raise ValueError("refit: full needs validation: cv (a holdout member already predicts the test images)")
        return self

