"""Hybrid refinement: the gradient step proposes, the coordinate step verifies and repairs.

The continuous step's projected sequences are scored whole, and each position they change is also
scored as a single-token edit, next to the coordinate method's own proposals. The improving single
edits are then combined exactly as in the coordinate method, so a projected sequence that is worse
as a whole still contributes its good positions.
"""

from __future__ import annotations

from collections.abc import Sequence

from refiners.methods.base import Proposal, RefinementMethod, StepInput, make_proposal
from refiners.methods.coordinate import CoordinateMethod, dedupe
from refiners.methods.gradient import GradientMethod


class HybridMethod(RefinementMethod):
    name = "hybrid"

    def __init__(self) -> None:
        self.gradient, self.coordinate = GradientMethod(), CoordinateMethod()

    def shortlist(self, inp: StepInput, budget: int) -> list[Proposal]:
        return self.coordinate.shortlist(inp, budget)

    def propose(
        self, inp: StepInput, budget: int, shortlisted: Sequence[Proposal] | None = None
    ) -> list[Proposal]:
        projected = self.gradient.propose(inp, max(1, budget // 8))
        singles = [make_proposal(inp, [e], p.estimate) for p in projected for e in p.edits]
        coordinate = self.coordinate.propose(inp, budget, shortlisted)
        return dedupe(projected + singles[: budget // 4] + coordinate, inp.body, budget)

    def combine(self, inp: StepInput, scored: list[tuple[Proposal, float]]) -> list[Proposal]:
        return self.coordinate.combine(inp, scored)
