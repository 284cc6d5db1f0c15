"""How hard one refinement step searches: the tuning constants of the methods and the lookahead.

They are chosen on held-out CommonGen items (``benchmarks/sweep.py`` compares configs side by side;
the figures behind each default are in ``benchmarks/README.md``), never on the benchmark's judge.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchConfig:
    """Budget splits and thresholds of a step. B is a request's ``candidates``.

    Args:
        lookahead_tokens: tokens after an edit that its lookahead scores exactly. The text after an
            inserted word adapts to it, which a first-order estimate cannot see; one token already
            shows most of it.
        lookahead_free_context: run the lookahead's windows without the prompt too, for the fluency
            term's reading. Off: that reading's change is taken to be the prompted one's, which halves
            the lookahead's work; on sets 200-239 it kept the same coverage gain and objective gain
            (benchmarks/README.md, "Speed").
        min_lookahead: lowest lookahead estimate still worth an exact score. The lookahead assumes the
            rest of the text unchanged, so it underrates edits the later text adapts to: below 0, not
            at 0.
        keyword_lookahead: keyword placements given a lookahead, per candidate of the budget (the
            first-order estimate orders placements poorly, so it screens several per candidate).
        general_lookahead: replacements, insertions and deletions given a lookahead, per candidate
            (0.5: the same tuning figures as 1.0 for 5% less step time, benchmarks/README.md).
        keyword_share: share of the budget that goes to missing keywords first, split between them
            (adding a missing keyword is what most often raises J).
        insertion_share: share of the general edits' lookahead that goes to insertions (2 at least).
        deletions: deletions kept by first-order estimate before the general edits are ranked.
        combined_edits: most single edits estimated to raise J stacked into one candidate.
        projected_share: hybrid: share of the budget for whole projected sequences of the continuous
            step (one at least); ``projected_singles_share``: for their positions as single edits.
        min_gain: a candidate must beat the current output by more than float noise between passes.
        span_words: most whole words a keyword placement may replace (1: one word; 2: also a word and
            the one after it, "a ball" -> "a frisbee" where the keyword would otherwise stand beside it).
        approximate_estimates: run the estimates' matrix products (the lookahead's passes, the methods'
            products with the embedding table) in the model's proposal dtype: bfloat16 on a CPU with
            native bfloat16 products (``refiners.packed``), which took 10% off Gemma's step with the
            same outputs (benchmarks/README.md). Scores stay float32 whatever this says.
        fluency_floor: when the fluency term is weighted, a kept change may lower it (the prompt-free
            reading, normalised) by at most this: a veto on awkward edits, beside its price in J.
            None: no floor.
    """

    lookahead_tokens: int = 1
    lookahead_free_context: bool = False
    min_lookahead: float = -0.5
    keyword_lookahead: int = 3
    general_lookahead: float = 0.5
    keyword_share: float = 0.75
    insertion_share: float = 0.25
    deletions: int = 4
    combined_edits: int = 4
    projected_share: float = 0.125
    projected_singles_share: float = 0.25
    min_gain: float = 1e-4
    span_words: int = 1
    approximate_estimates: bool = True
    fluency_floor: float | None = None

    def __post_init__(self) -> None:
        if min(self.lookahead_tokens, self.deletions) < 0:
            raise ValueError("lookahead_tokens and deletions must be >= 0")
        if min(self.combined_edits, self.span_words) < 1:
            raise ValueError("combined_edits and span_words must be >= 1")
        shares = (
            self.keyword_share,
            self.insertion_share,
            self.projected_share,
            self.projected_singles_share,
        )
        if not all(0 <= s <= 1 for s in shares) or self.keyword_lookahead < 0 or self.general_lookahead < 0:
            raise ValueError("budget shares must be between 0 and 1 and lookahead counts >= 0")

    def keyword_shortlist(self, budget: int, keywords: int) -> int:
        """Keyword placements given a lookahead per missing keyword (one at least)."""
        return max(1, self.keyword_lookahead * budget // max(1, keywords))

    def general_shortlist(self, budget: int) -> int:
        """General edits given a lookahead (one at least)."""
        return max(1, int(self.general_lookahead * budget))

    def shortlist(self, budget: int, keywords: int) -> int:
        """Most edits given a lookahead in one step: what the cost model budgets for."""
        placements = self.keyword_shortlist(budget, keywords) * keywords if keywords else 0
        return max(placements, self.keyword_lookahead * budget) + self.general_shortlist(budget)
