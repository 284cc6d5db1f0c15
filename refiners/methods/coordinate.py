"""Coordinate refinement (HotFlip / GCG style): the gradient ranks every single-token edit.

With the output relaxed to one-hot rows, the gradient of J with respect to row i, mapped through the
embedding matrix E (V, d), is the first-order gain of writing token v at position i:

    gain[i, v] = own[i, v]                           # the objective's terms: the token's own change
               + (E[v] - E[y_i]) . dJ/de_i           # its effect on later tokens

``own`` is what the terms estimate for an edit that changes each reading's token log-probability sum
by log p(v | ., y_<i) - log p(y_i | ., y_<i), read exactly from the same forward pass (the
log-probability terms renormalise it, the length term prices the length change, the keyword term a
keyword written). Insertions and deletions reuse those distributions (the token that moves into
position i is scored by p(. | ., y_<i)).

These estimates only choose what to look at. Every single edit worth scoring goes through the step's
lookahead first: the placements of wanted phrases (missing keywords) the first-order estimate ranks
best, and the general edits (replacements, insertions, deletions) it estimates to raise J. Then at most
B edits whose lookahead estimate says they can pay go to exact scoring, which is the step's main cost,
with stacks of the ones estimated to raise J that do not overlap, in the same pass (on tuning sets this
found more than stacking the exactly improving ones in a second pass, and a GPU pays for every pass).
The refiner keeps the best candidate if it improves J.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from refiners.edits import Edit
from refiners.methods.base import (
    Proposal,
    RefinementMethod,
    StepInput,
    dedupe,
    make_proposal,
    token_spans,
)

if TYPE_CHECKING:
    from refiners.lookahead import Lookahead


def later_gains(step: StepInput) -> torch.Tensor:
    """(m, V) first-order effect on later tokens of writing token v at position i:
    (E[v] - E[y_i]) . dJ/de_i."""
    current = (step.grad * step.embeds).sum(-1, keepdim=True)  # (m, 1)
    return step.vocab.times_table(step.grad).sub_(current)


def later_gain_of(step: StepInput, token: int) -> torch.Tensor:
    """(m,) the column of ``later_gains`` for one token, without the (m, V) matrix."""
    return step.grad @ step.vocab.embedding[token] - (step.grad * step.embeds).sum(-1)


def replacement_gains(step: StepInput) -> torch.Tensor:
    """(m, V) estimated gain of replacing y_i by v (-inf for forbidden or unchanged tokens)."""
    m = len(step.body)
    at, body = torch.arange(m), torch.tensor(step.body, device=step.grad.device)
    own = step.estimate(step.per_reading(lambda d: d[:m] - d[at, body][:, None]))
    gains = own + later_gains(step)
    gains[:, ~step.vocab.allowed] = float("-inf")
    gains[at, body] = float("-inf")
    return gains


def removals(step: StepInput, replacements: int = 2, words_before: int = 2) -> list[Proposal]:
    """For each present phrase the objective wants removed (a word to avoid): every occurrence deleted,
    alone and with the one or two words before it ("with a ball"), then every occurrence replaced by
    the single tokens the first-order estimate ranks best there."""
    if not step.unwanted:
        return []
    gains = replacement_gains(step)
    out = []
    for phrase in step.unwanted:
        spans = token_spans(step, phrase)
        for extra in range(words_before + 1):
            starts = [word_start(step, i, extra) for i, _ in spans]
            edits = [Edit("delete", s, tuple(step.body[s:j]), ()) for s, (_, j) in zip(starts, spans)]
            out.append(make_proposal(step, edits, 0.0))
        best = {i: gains[i].topk(replacements).indices.tolist() for i, _ in spans}
        for rank in range(replacements):
            edits = [Edit("replace", i, tuple(step.body[i:j]), (best[i][rank],)) for i, j in spans]
            out.append(make_proposal(step, edits, 0.0))
    return out


def word_start(step: StepInput, i: int, words: int) -> int:
    """The position of the start of the ``words``-th word before the one at position i (0: i itself)."""
    for _ in range(words):
        i -= 1
        while i > 0 and not step.vocab.starts_word[step.body[i]]:
            i -= 1
        i = max(i, 0)
    return i


# A keyword placement as phrase_edits ranks it: (-estimate, (spelling, boundary, words replaced), edit).
Placement = tuple[float, tuple[int, int, int], Edit]


def shortest_spellings(ranked: list[Placement]) -> list[Placement]:
    """Of the placements at one place whose spellings start with the same token, the one with the
    fewest tokens, at the best rank among them. A first-order estimate sees only the first token and
    counts the others as free while they lengthen the output, so "bikiniing" outranks "bikini"."""
    shortest: dict[tuple[int, int, int], Placement] = {}
    rank: dict[tuple[int, int, int], int] = {}
    for n, r in enumerate(ranked):
        (_, (_, b, w), edit) = r
        key = (b, w, edit.new_tokens[0])
        rank.setdefault(key, n)
        if key not in shortest or len(edit.new_tokens) < len(shortest[key][2].new_tokens):
            shortest[key] = r
    return [shortest[key] for key in sorted(rank, key=rank.__getitem__)]


def top_edits(gains: torch.Tensor, k: int) -> list[tuple[float, int, int]]:
    """The k largest entries of ``gains`` (rows, V) as (value, row, token), best first."""
    # Each row's top k first, then the top k of those: the same entries, ~10x faster than one topk
    # over the flattened (m, V) matrix when V is 262k (Gemma).
    per_row = min(k, gains.shape[1])
    row_values, row_tokens = gains.topk(per_row, dim=-1)  # (rows, per_row)
    values, flat = row_values.flatten().topk(min(k, row_values.numel()))
    tokens = row_tokens.flatten()[flat]
    rows = torch.div(flat, per_row, rounding_mode="floor")
    # One device->host copy (float64 holds every row and token id exactly).
    host_values, host_rows, host_tokens = torch.stack(
        [values.double(), rows.double(), tokens.double()]
    ).tolist()
    return [(v, int(i), int(t)) for v, i, t in zip(host_values, host_rows, host_tokens, strict=True)]


def placement_estimates(
    step: StepInput, phrase: str, boundaries: list[int], spans: list[tuple[int, int, int, int]]
) -> list[Placement]:
    """Every placement of the phrase's spellings, inserted at each of ``boundaries`` or replacing each
    of ``spans`` ((boundary, start, end, words), sorted by end - start), with its first-order estimate.

    The positions go to the device in one copy and every estimate comes back in one (on a GPU each copy
    of a small tensor is a sync). Per spelling length (an estimate takes one length change), every
    spelling of that length is estimated at once: at each boundary, and over each group of spans that
    remove as many tokens."""
    spellings, device = step.vocab.keyword_spellings(phrase), step.grad.device
    # Every replacement takes the later effect of the first spelling that replaces some span's first
    # token (one that differs from it).
    replacing = next((t for t in spellings if any(step.body[i] not in t for _, i, _, _ in spans)), None)
    later = None if replacing is None else later_gain_of(step, replacing[0])
    starts_at = [i for _, i, _, _ in spans]
    index = torch.tensor(
        [*boundaries, *starts_at, *(step.body[i] for i in starts_at)], dtype=torch.long, device=device
    )
    at_boundaries, at_spans, old = index.split([len(boundaries), len(spans), len(spans)])
    removed = [j - i for _, i, j, _ in spans]
    estimates: list[torch.Tensor] = []
    entries: list[tuple[tuple[int, int, int], Edit] | None] = []  # what each estimate is (None: none)
    for n_new in dict.fromkeys(len(t) for t in spellings):
        same = [s for s, t in enumerate(spellings) if len(t) == n_new]
        firsts = torch.tensor([spellings[s][0] for s in same], device=device)
        inserted = step.per_reading(lambda d, v=firsts: d[at_boundaries][:, v])  # (boundaries, spellings)
        estimates.append(step.estimate(inserted, n_new, phrase).flatten())
        entries += [
            ((s, b, 0), Edit("insert", i, (), spellings[s])) for b, i in enumerate(boundaries) for s in same
        ]
        if later is None:
            continue
        delta = {}
        for r, d in step.distributions.items():
            # The span's tokens after its first leave the text, and their log-probabilities S.
            prefix = step.logprob_prefix_sums[r]
            dropped = torch.tensor([prefix[j] - prefix[i + 1] for _, i, j, _ in spans], device=device)
            delta[r] = d[at_spans][:, firsts] - d[at_spans, old][:, None] - dropped[:, None]
        for length in dict.fromkeys(removed):
            rows = slice(removed.index(length), len(removed) - removed[::-1].index(length))
            own = step.estimate({r: v[rows] for r, v in delta.items()}, n_new - length, phrase)
            estimates.append((own + later[at_spans[rows]][:, None]).flatten())
            entries += [
                ((s, b, w), Edit("replace", i, tuple(step.body[i:j]), spellings[s]))
                if step.body[i] not in spellings[s]
                else None
                for b, i, j, w in spans[rows]
                for s in same
            ]
    gains = torch.cat(estimates).tolist() if estimates else []
    return [(-g, *e) for g, e in zip(gains, entries, strict=True) if e is not None]


class CoordinateMethod(RefinementMethod):
    """Propose the best single-position replacements, insertions, deletions and keyword edits."""

    name = "coordinate"

    def propose(self, steps: Sequence[StepInput], lookahead: Lookahead) -> list[list[Proposal]]:
        chosen = self.singles(steps, lookahead)
        return [singles + self.stacks(step, singles) for step, singles in zip(steps, chosen)]

    def singles(self, steps: Sequence[StepInput], lookahead: Lookahead) -> list[list[Proposal]]:
        """Each request's shortlist, looked ahead, then chosen (at most B edits)."""
        shortlists = [self.shortlist(step) for step in steps]
        looked = lookahead(steps, shortlists) if any(shortlists) else shortlists
        return [self.choose(step, shortlisted) for step, shortlisted in zip(steps, looked)]

    def shortlist(self, step: StepInput) -> list[Proposal]:
        """The single edits worth a lookahead: the best placements of each wanted phrase and the
        general edits whose first-order estimate raises J most (``SearchConfig`` says how many)."""
        budget, wanted = step.config.candidates, list(step.wanted)
        share = self.search.keyword_shortlist(budget, len(wanted))
        placements = [p for phrase in wanted for p in self.phrase_edits(step, phrase, share)]
        return placements + self.general_edits(step, self.search.general_shortlist(budget))

    def choose(self, step: StepInput, shortlisted: Sequence[Proposal]) -> list[Proposal]:
        """Up to B candidates whose lookahead estimate can pay, best first: the removals of unwanted
        phrases (words to avoid), most of the budget to the wanted phrases, shared between them, then
        general edits, then more phrase placements."""
        budget = step.config.candidates
        ranked = [
            p
            for p in sorted(shortlisted, key=lambda p: -p.estimate)
            if p.estimate > self.search.min_lookahead and step.allows(p.body)
        ]
        placements = [p for p in ranked if p.phrase is not None]
        general = [p for p in ranked if p.phrase is None]
        first: list[Proposal] = []
        if step.wanted:
            share = max(1, int(budget * self.search.keyword_share) // len(step.wanted))
            for phrase in step.wanted:
                first += [p for p in placements if p.phrase == phrase][:share]
        return dedupe(removals(step) + first + general + placements, step.body, budget)

    def general_edits(self, step: StepInput, k: int) -> list[Proposal]:
        """The k replacements, insertions and deletions with the best first-order estimates above 0.

        An edit whose estimate does not raise J is not worth scoring: on greedy outputs such edits
        almost never improve. Phrase placements are judged by the lookahead instead: their estimate
        misses how the text after them adapts (an inserted word's later effect is not in the gradient).
        """
        general = self.insertions(step, max(2, int(k * self.search.insertion_share)))
        if step.body:
            general += self.replacements(step, k) + self.deletions(step)
        return sorted((p for p in general if p.estimate > 0), key=lambda p: -p.estimate)[:k]

    def replacements(self, step: StepInput, k: int) -> list[Proposal]:
        out = []
        for value, i, v in top_edits(replacement_gains(step), k):
            if value == float("-inf"):
                break
            out.append(make_proposal(step, [Edit("replace", i, (step.body[i],), (v,))], value))
        return out

    def deletions(self, step: StepInput) -> list[Proposal]:
        """The best deletions: the token after a deleted one moves into its position."""
        m = len(step.body)
        at, body = torch.arange(m), torch.tensor(step.body, dtype=torch.long)
        following = torch.tensor(
            [*step.body[1:], *(step.tail[:1] or [-1])][:m], dtype=torch.long, device=step.grad.device
        )
        moves = following >= 0  # the last token of an output without EOS has nothing after it

        def delta(d: torch.Tensor) -> torch.Tensor:
            change = -d[at, body]
            nxt = following.clamp(min=0)
            return torch.where(moves, change + d[at, nxt] - d[at + 1, nxt], change)

        gains = step.estimate(step.per_reading(delta), -1).tolist()
        out = [make_proposal(step, [Edit("delete", i, (step.body[i],), ())], g) for i, g in enumerate(gains)]
        return sorted(out, key=lambda p: -p.estimate)[: self.search.deletions]

    def insertions(self, step: StepInput, k: int) -> list[Proposal]:
        """The k best single-token insertions (a token inserted before position i, i = 0..m)."""
        allowed = step.vocab.allowed

        def delta(d: torch.Tensor) -> torch.Tensor:
            return d[: len(step.body) + 1].masked_fill(~allowed, float("-inf"))

        gains = step.estimate(step.per_reading(delta), 1)
        return [make_proposal(step, [Edit("insert", i, (), (v,))], g) for g, i, v in top_edits(gains, k)]

    def phrase_edits(self, step: StepInput, phrase: str, k: int) -> list[Proposal]:
        """The k best placements of the phrase (any inflection) by first-order estimate: inserted at a
        word boundary, or replacing a whole word (or up to ``SearchConfig.span_words`` words), one
        spelling per first token at each place (``shortest_spellings``). Estimates are computed for
        every placement at once and only the k kept become proposals (each copies the body: m x
        placements would not fit)."""
        starts = [step.vocab.starts_word[t] for t in step.body] + [True]
        boundaries = [i for i in range(1, len(step.body) + 1) if starts[i]]  # spellings start with a space
        # Spans [i, j) of 1 .. span_words whole words, the first of one token (its first-order change is
        # read at i; the lookahead then makes the window exact), grouped by the tokens they remove.
        spans = sorted(
            (
                (b, i, boundaries[b + w], w)
                for w in range(1, self.search.span_words + 1)
                for b, i in enumerate(boundaries[: len(boundaries) - w])
                if starts[i + 1]
            ),
            key=lambda span: span[2] - span[1],
        )
        # Sorted by estimate; the order the edits were made in breaks ties, as a stable sort would
        # (spelling, boundary, words replaced: 0 for an insertion).
        ranked = sorted(placement_estimates(step, phrase, boundaries, spans), key=lambda r: (r[0], r[1]))
        ranked = shortest_spellings(ranked)
        return [make_proposal(step, [edit], -neg, phrase) for neg, _, edit in ranked[:k]]

    def stacks(self, step: StepInput, proposals: Sequence[Proposal]) -> list[Proposal]:
        """The best 2, 3, ... single edits estimated to raise J that do not overlap (one per phrase),
        stacked greedily by estimate."""
        singles = (p for p in proposals if p.estimate > 0 and len(p.edits) == 1)
        improving = sorted(singles, key=lambda p: -p.estimate)
        chosen: list[Proposal] = []
        phrases: set[str] = set()
        for p in improving:
            if any(p.edits[0].overlaps(c.edits[0]) for c in chosen) or (p.phrase and p.phrase in phrases):
                continue
            chosen.append(p)
            if p.phrase:
                phrases.add(p.phrase)
            if len(chosen) == self.search.combined_edits:
                break
        return [make_proposal(step, [c.edits[0] for c in chosen[:k]], 0.0) for k in range(2, len(chosen) + 1)]
