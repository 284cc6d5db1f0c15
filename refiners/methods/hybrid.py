"""Hybrid refinement: the gradient step proposes, the coordinate step verifies and repairs.

The continuous step's projected sequences are scored whole, and each position they change is also
scored as a single-token edit, next to the coordinate method's own proposals. The single edits
estimated to raise J are stacked as in the coordinate method, so a projected sequence that is worse
as a whole still contributes its good positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from refiners.methods.base import Proposal, RefinementMethod, StepInput, dedupe, make_proposal
from refiners.methods.coordinate import CoordinateMethod
from refiners.methods.gradient import GradientMethod
from refiners.search import SearchConfig

if TYPE_CHECKING:
    from refiners.lookahead import Lookahead


class HybridMethod(RefinementMethod):
    """The gradient method's projections and their single edits, next to the coordinate proposals."""

    name = "hybrid"

    def __init__(self, search: SearchConfig | None = None) -> None:
        super().__init__(search)
        self.gradient, self.coordinate = GradientMethod(self.search), CoordinateMethod(self.search)

    def propose(self, steps: Sequence[StepInput], lookahead: Lookahead) -> list[list[Proposal]]:
        coordinate = self.coordinate.singles(steps, lookahead)
        merged = [self._merge(step, own) for step, own in zip(steps, coordinate)]
        return [singles + self.coordinate.stacks(step, singles) for step, singles in zip(steps, merged)]

    def _merge(self, step: StepInput, coordinate: list[Proposal]) -> list[Proposal]:
        """Projected sequences, then their positions as single edits, then the coordinate ones."""
        budget = step.config.candidates
        projected = self.gradient.projected(step, max(1, int(budget * self.search.projected_share)))
        singles = [make_proposal(step, [e], p.estimate) for p in projected for e in p.edits]
        singles = singles[: int(budget * self.search.projected_singles_share)]
        return dedupe(projected + singles + coordinate, step.body, budget)
