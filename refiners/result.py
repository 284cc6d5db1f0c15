"""What a refinement returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RefineResult:
    """The outcome of refining one output.

    ``objective_before`` / ``objective_after`` map ``"total"`` to the weighted objective J and each
    term's name to its unweighted value. ``edits`` lists the accepted edits in the order applied, each
    ``{"op", "position", "old_tokens", "new_tokens", "old_text", "new_text", "step"}``; positions refer
    to the sequence as it was at that step. The refined output never has a lower total than the initial.
    ``candidates_scored`` counts whole candidates scored exactly (not the few-token lookahead windows).
    The step's time, in parts that add up to ``refine_seconds`` (a batch's time is shared evenly by its
    requests): ``prompt_seconds`` the prompts' pass (zero when generation's cache is reused, but for
    the prompt-free context), ``gradient_seconds`` the gradient pass, ``propose_seconds`` the methods'
    own work on the gradient, ``lookahead_seconds`` the lookahead passes, ``scoring_seconds`` the exact
    scoring passes.
    """

    method: str
    initial_ids: list[int]
    refined_ids: list[int]
    initial_text: str
    refined_text: str
    objective_before: dict[str, float]
    objective_after: dict[str, float]
    edits: list[dict] = field(default_factory=list)
    candidates_scored: int = 0
    prompt_seconds: float = 0.0
    gradient_seconds: float = 0.0
    propose_seconds: float = 0.0
    lookahead_seconds: float = 0.0
    scoring_seconds: float = 0.0
    steps: int = 0

    @property
    def refine_seconds(self) -> float:
        return (
            self.prompt_seconds
            + self.gradient_seconds
            + self.propose_seconds
            + self.lookahead_seconds
            + self.scoring_seconds
        )

    @property
    def improved(self) -> bool:
        return self.objective_after["total"] > self.objective_before["total"]
