"""Coordinate refinement (HotFlip / GCG style): the gradient ranks every single-token edit.

With the output relaxed to one-hot rows, the gradient of J with respect to row i, mapped through the
embedding matrix E (V, d), is the first-order gain of writing token v at position i:

    gain[i, v] = w * (log p(v | X, y_<i) - log p(y_i | X, y_<i)) / lp(n)     # the token's own term
               + (E[v] - E[y_i]) . dJ/de_i                                    # its effect on later tokens

(with the fluency term on, the own term adds w_fluency times the same change without the prompt X).
The own term is read exactly from the same forward pass. Insertions and deletions reuse those
distributions (the token that moves into position i is scored by p(. | X, y_<i)); keyword edits add
their exact coverage gain.

These estimates only choose what to look at. Every single edit worth scoring goes through a lookahead
first (``shortlist``): the keyword placements the first-order estimate ranks best, and the general edits
(replacements, insertions, deletions) it estimates to raise J; the refiner scores each one's tokens and
the few after it exactly. ``propose`` sends to exact scoring at most B of those whose lookahead
estimate says they can pay: the first-order estimate orders keyword placements poorly, and on greedy
outputs general edits with a positive first-order estimate almost never raise J (3 of 279 scored on
held-out items), while exact scoring is the step's main cost. The improving candidates that do not
overlap are then combined and scored too, and the refiner keeps the best one if it improves J.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refiners.edits import Edit
from refiners.methods.base import Proposal, RefinementMethod, StepInput, make_proposal

MAX_COMBINED_EDITS = 4
# Keyword placements given a lookahead, per candidate of the budget. The first-order estimate orders
# placements poorly (the text after an inserted word adapts, and it sees only a keyword's first
# token); exact values over the placement and the tokens after it order them well (see refiner.py).
LOOKAHEAD_PER_CANDIDATE = 3
# General edits given a lookahead, per candidate of the budget.
GENERAL_LOOKAHEAD_PER_CANDIDATE = 1.0
# Lowest lookahead estimate for which an edit is scored exactly. The lookahead is exact over the edit's
# window and assumes the rest of the text unchanged, so it underrates edits that the later text adapts
# to: on held-out CommonGen items 200-279 every keyword placement that raised J had a lookahead
# estimate above -0.5 (65 of 65; 53 of 185 scored were below), and "A door is open." -> "The door ..."
# (item 105) raises J by 0.53 with a lookahead estimate of -0.24. With a threshold of 0 (and half a
# budget) for general edits, such edits were lost and the judge's median perplexity on the 200 benchmark
# sets was +9.8% (results/quality-all-methods.json), against +4.3% now (results/quality.json).
MIN_LOOKAHEAD = -0.5


def replacement_gains(inp: StepInput) -> torch.Tensor:
    """(m, V) estimated gain of replacing y_i by v (-inf for forbidden or unchanged tokens)."""
    m = len(inp.body)
    body = torch.tensor(inp.body, device=inp.logprobs.device)
    current = inp.logprobs[torch.arange(m), body]  # (m,)
    own = inp.logprobs[:m] - current[:, None]  # (m, V) change of S
    later = inp.grad @ inp.vocab.embedding.T - (inp.grad * inp.embeds).sum(-1, keepdim=True)  # (m, V)
    gains = inp.estimated_gain(own, 0) + later
    gains[:, ~inp.vocab.allowed] = float("-inf")
    gains[torch.arange(m), body] = float("-inf")
    return gains


class CoordinateMethod(RefinementMethod):
    """Propose the best single-position replacements, insertions, deletions and keyword edits."""

    name = "coordinate"

    def shortlist(self, inp: StepInput, budget: int) -> list[Proposal]:
        """The single edits worth a lookahead: LOOKAHEAD_PER_CANDIDATE x budget keyword placements, and
        GENERAL_LOOKAHEAD_PER_CANDIDATE x budget general edits whose first-order estimate raises J most."""
        placements = []
        if inp.missing_keywords:
            share = max(1, LOOKAHEAD_PER_CANDIDATE * budget // len(inp.missing_keywords))
            placements = [p for kw in inp.missing_keywords for p in self._keyword_edits(inp, kw, share)]
        return placements + self._general_edits(inp, max(1, int(GENERAL_LOOKAHEAD_PER_CANDIDATE * budget)))

    def propose(
        self, inp: StepInput, budget: int, shortlisted: Sequence[Proposal] | None = None
    ) -> list[Proposal]:
        """Up to ``budget`` candidates. After a lookahead (``shortlisted``), the edits whose lookahead
        estimate can pay, best first: most of the budget to missing keywords, shared between them, then
        general edits, then more keyword placements. Without one (None), by first-order estimates."""
        if shortlisted is None:
            shortlisted, minimum = self.shortlist(inp, budget), float("-inf")
        else:
            minimum = MIN_LOOKAHEAD
        ranked = sorted(shortlisted, key=lambda p: -p.estimate)
        keyword = [p for p in ranked if p.keyword is not None and p.estimate > minimum]
        general = [p for p in ranked if p.keyword is None and p.estimate > minimum]
        first: list[Proposal] = []
        if inp.missing_keywords:
            # Adding a missing keyword is what most often raises J.
            share = max(1, (budget * 3 // 4) // len(inp.missing_keywords))
            for kw in inp.missing_keywords:
                first += [p for p in keyword if p.keyword == kw][:share]
        return dedupe(first + general + keyword, inp.body, budget)

    def _general_edits(self, inp: StepInput, k: int) -> list[Proposal]:
        """The k replacements, insertions and deletions with the best first-order estimates above 0.

        An edit whose estimate does not raise J is not worth scoring: on greedy outputs such edits
        almost never improve. Keyword edits are judged by the lookahead instead: their estimate misses
        how the text after them adapts (an inserted word's later effect is not in the gradient).
        """
        general = self._insertions(inp, max(2, k // 4))
        if inp.body:
            general += self._replacements(inp, k) + self._deletions(inp)
        return sorted((p for p in general if p.estimate > 0), key=lambda p: -p.estimate)[:k]

    def _replacements(self, inp: StepInput, k: int) -> list[Proposal]:
        gains = replacement_gains(inp)
        values, flat = gains.flatten().topk(min(k, gains.numel()))
        out = []
        for value, index in zip(values.tolist(), flat.tolist()):
            if value == float("-inf"):
                break
            i, v = divmod(index, gains.shape[1])
            out.append(make_proposal(inp, [Edit("replace", i, (inp.body[i],), (v,))], value))
        return out

    def _deletions(self, inp: StepInput) -> list[Proposal]:
        m, lp = len(inp.body), inp.logprobs
        out = []
        for i in range(m):
            following = inp.body[i + 1] if i + 1 < m else (inp.tail[0] if inp.tail else None)
            delta = -lp[i, inp.body[i]]
            if following is not None:  # the next token moves into position i
                delta = delta + lp[i, following] - lp[i + 1, following]
            gain = float(inp.estimated_gain(delta, -1))
            out.append(make_proposal(inp, [Edit("delete", i, (inp.body[i],), ())], gain))
        return sorted(out, key=lambda p: -p.estimate)[:4]

    def _insertions(self, inp: StepInput, k: int) -> list[Proposal]:
        lp = inp.logprobs[: len(inp.body) + 1].clone()  # (m + 1, V): a token inserted before position i
        lp[:, ~inp.vocab.allowed] = float("-inf")
        gains = inp.estimated_gain(lp, 1)
        values, flat = gains.flatten().topk(min(k, gains.numel()))
        out = []
        for value, index in zip(values.tolist(), flat.tolist()):
            i, v = divmod(index, gains.shape[1])
            out.append(make_proposal(inp, [Edit("insert", i, (), (v,))], value))
        return out

    def _keyword_edits(self, inp: StepInput, keyword: str, k: int) -> list[Proposal]:
        """The k best placements of the keyword (any inflection) by first-order estimate: inserted at a
        word boundary, or replacing a whole word. Estimates are computed for every placement at once
        and only the k kept become proposals (each copies the body: m x placements would not fit)."""
        m, lp, vocab = len(inp.body), inp.logprobs, inp.vocab
        starts = [vocab.starts_word[t] for t in inp.body] + [True]
        boundaries = [i for i in range(1, m + 1) if starts[i]]  # mid-sentence spellings start with a space
        later = None
        # (-estimate, (spelling, boundary, 0 insert / 1 replace), edit): sorted, the order the edits
        # were made in breaks ties, as a stable sort of them by estimate would.
        ranked: list[tuple[float, tuple[int, int, int], Edit]] = []
        for s, spelling in enumerate(vocab.keyword_spellings(keyword)):
            first, n_new = spelling[0], len(spelling)
            gains = inp.estimated_gain(lp[boundaries, first], n_new, 1).tolist()
            for b, (i, gain) in enumerate(zip(boundaries, gains)):
                ranked.append((-gain, (s, b, 0), Edit("insert", i, (), spelling)))
            replaced = [
                (b, i)
                for b, i in enumerate(boundaries)
                if i < m and starts[i + 1] and inp.body[i] not in spelling
            ]
            if not replaced:
                continue
            if later is None:  # the later-token effect of the first replacing spelling's first token
                later = inp.grad @ vocab.embedding[first] - (inp.grad * inp.embeds).sum(-1)
            at = [i for _, i in replaced]
            old = torch.tensor([inp.body[i] for i in at], device=lp.device)
            gains = (inp.estimated_gain(lp[at, first] - lp[at, old], n_new - 1, 1) + later[at]).tolist()
            for (b, i), gain in zip(replaced, gains):
                ranked.append((-gain, (s, b, 1), Edit("replace", i, (inp.body[i],), spelling)))
        ranked.sort(key=lambda r: (r[0], r[1]))
        return [make_proposal(inp, [edit], -neg, keyword) for neg, _, edit in ranked[:k]]

    def combine(self, inp: StepInput, scored: list[tuple[Proposal, float]]) -> list[Proposal]:
        """Greedily stack the best improving single edits that do not overlap (one per keyword)."""
        improving = sorted(
            ((p, t) for p, t in scored if t > inp.total and len(p.edits) == 1), key=lambda pt: -pt[1]
        )
        chosen: list[Proposal] = []
        keywords: set[str] = set()
        for p, _ in improving:
            if any(p.edits[0].overlaps(c.edits[0]) for c in chosen) or (p.keyword and p.keyword in keywords):
                continue
            chosen.append(p)
            if p.keyword:
                keywords.add(p.keyword)
            if len(chosen) == MAX_COMBINED_EDITS:
                break
        return [
            make_proposal(inp, [c.edits[0] for c in chosen[:k]], 0.0, None) for k in range(2, len(chosen) + 1)
        ]


def dedupe(proposals: list[Proposal], current: list[int], budget: int) -> list[Proposal]:
    """Keep the first proposal of each distinct output, never the unchanged one, at most ``budget``."""
    seen = {tuple(current)}
    out = []
    for p in proposals:
        key = tuple(p.body)
        if key not in seen:
            seen.add(key)
            out.append(p)
        if len(out) == budget:
            break
    return out
