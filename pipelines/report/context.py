"""What a report is made from: the ensemble's gathered members, their ablation and the competition, read once."""

from __future__ import annotations

import numpy as np

from .. import ensemble as ens_math
from .. import submission
from ..ablate import Ablation
from ..config import Project


class ReportContext:
    """What every section reads: the ablation, the members' validation probabilities, the ensemble's blend."""

    def __init__(self, project: Project, result: Ablation):
        self.project, self.result = project, result
        self.g = result.gathered
        self.comp = self.g.competition
        self.names = result.names
        self.vocab = self.g.outcomes[0].entry.vocab
        self.targets = self.g.outcomes[0].entry.arrays["valid_targets"].astype(int)
        self.valid = [o.entry.probs("valid", result.probs).astype("float64") for o in result.outcomes]
        self.weights = [o.member.weight for o in result.outcomes]
        self.higher_better = ens_math.GREATER_IS_BETTER[result.metric]
        self.cv = self.g.cv
        self.n = len(self.targets)
        self.combine = self.g.ensemble.combine
        self.k = len(np.unique(self.g.fold_ids)) if self.cv else None  # the cross-validation's folds
        self._blends = {}
        # the ensemble's validation rows as its honest score sees them: a learned blend's nested-CV predictions
        # (each row blended by weights learned without it), not the in-sample ones that flatter it
        self.full = self.blend(result.probs).held_out

    @property
    def rows(self) -> str:
        """What the scores are computed on: the holdout's validation images, or every training image out of fold."""
        if not self.cv:
            return f"{self.n} validation images"
        return f"out-of-fold (OOF) over {self.n} training images, {self.k} folds"

    @property
    def scope(self) -> str:
        """The scores' short name, for axes and column headers."""
        return "OOF" if self.cv else "validation"

    def blend(self, kind: str) -> ens_math.Blended:
        """The members' `kind` probabilities blended as the ensemble's `combine:` says, with its honest score
        (nested cross-validation over the blend folds for learned blends), as `ens run` scores it."""
        if kind not in self._blends:
            self._blends[kind] = ens_math.blend(
                self.combine, [x.entry.probs("valid", kind) for x in self.result.outcomes],
                [x.entry.probs("test", kind) for x in self.result.outcomes], self.targets, self.weights,
                self.g.blend_folds(), self.result.metric)
        return self._blends[kind]

    def test_score(self, test_probs: np.ndarray) -> float | None:
        """The metric on the local answers (competitions scored here), as `ens run` scores members."""
        if not self.comp.solution:
            return None
        solution = self.g.data.root / self.comp.solution
        if not solution.is_file():
            return None
        entry = self.g.outcomes[0].entry
        ids = [str(i) for i in entry.arrays["test_ids"]]
        values = submission.submission_values(self.comp, test_probs, self.vocab)  # labels, or probabilities
        return submission.score_values(ids, values, solution, self.comp)
