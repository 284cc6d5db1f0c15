"""Gradient refinement: one continuous step on the output embeddings, then projection to tokens.

    e'_i = e_i + eta * r * g_i / max_j |g_j|        (r: mean embedding norm, so eta is scale-free)
    y'_i = argmin_v |E[v] - e'_i|                    (nearest allowed token)

Keyword coverage is not differentiable in the text, so a smooth stand-in steers the step: for each
phrase a term wants written (a missing keyword), the position whose embedding is closest (cosine) to
the phrase's first token is pulled towards it, as hard as the term's weight. One gradient pass gives
one direction; the step is tried at several sizes (eta * 2^k), all projected and scored exactly in
one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from refiners.edits import Edit
from refiners.methods.base import Proposal, RefinementMethod, StepInput, dedupe, make_proposal
from refiners.methods.coordinate import removals

if TYPE_CHECKING:
    from refiners.lookahead import Lookahead


def phrase_pull(step: StepInput) -> torch.Tensor:
    """(m, d) gradient of sum over wanted phrases of weight * max_i cos(e_i, E[phrase's first token])."""
    pull = torch.zeros_like(step.embeds)
    if not step.body:
        return pull
    e = step.embeds
    e_norm = e.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    for phrase, weight in step.wanted.items():
        spellings = step.vocab.keyword_spellings(phrase)
        if not spellings:
            continue
        k = step.vocab.embedding[spellings[0][0]]
        cos = (e @ k) / (e_norm.squeeze(-1) * k.norm().clamp(min=1e-6))
        i = int(cos.argmax())
        # d cos(e, k) / d e = k / (|e| |k|) - cos * e / |e|^2
        pull[i] += weight * (k / (e_norm[i] * k.norm()) - cos[i] * e[i] / e_norm[i] ** 2)
    return pull


def project(step: StepInput, embeds: torch.Tensor) -> list[int]:
    """Nearest allowed token (L2) for each row of ``embeds`` (m, d)."""
    table = step.vocab.embedding
    # |E_v - e|^2 = |E_v|^2 - 2 E_v . e + |e|^2; the last term does not change the argmin.
    distance = (table * table).sum(-1)[None] - 2 * step.vocab.times_table(embeds)  # (m, V)
    distance[:, ~step.vocab.allowed] = float("inf")
    return distance.argmin(-1).tolist()


class GradientMethod(RefinementMethod):
    """Take one step of size eta along the gradient, project to tokens, keep only if better."""

    name = "gradient"

    def propose(self, steps: Sequence[StepInput], lookahead: Lookahead) -> list[list[Proposal]]:
        budget = [step.config.candidates for step in steps]
        return [dedupe(removals(s) + self.projected(s, b), s.body, b) for s, b in zip(steps, budget)]

    def projected(self, step: StepInput, budget: int) -> list[Proposal]:
        """Up to ``budget`` projections of the step at sizes eta / 4, eta / 2, eta, 2 eta, ..."""
        m = len(step.body)
        if not m:
            return []
        direction = step.grad + phrase_pull(step)  # (m, d)
        scale = direction.norm(dim=-1).max().clamp(min=1e-12)
        radius = step.vocab.embedding.norm(dim=-1).mean()
        out = []
        for k in range(budget):
            eta = step.config.step_size * 2.0 ** (k - 2)
            tokens = project(step, step.embeds + eta * radius * direction / scale)
            edits = [
                Edit("replace", i, (old,), (new,))
                for i, (old, new) in enumerate(zip(step.body, tokens))
                if old != new
            ]
            if edits:
                out.append(make_proposal(step, edits, -float(k)))
            if len(edits) == m:  # every position moved: larger steps only move further away
                break
        return dedupe(out, step.body, budget)
