"""Gradient refinement: one continuous step on the output embeddings, then projection to tokens.

    e'_i = e_i + eta * r * g_i / max_j |g_j|        (r: mean embedding norm, so eta is scale-free)
    y'_i = argmin_v |E[v] - e'_i|                    (nearest allowed token)

Keyword coverage is not differentiable in the text, so its smooth stand-in steers the step: for each
missing keyword, the position whose embedding is closest (cosine) to the keyword's first token is
pulled towards it. One gradient pass gives one direction; the step is tried at several sizes
(eta * 2^k), all projected and scored exactly in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refiners.edits import Edit
from refiners.methods.base import Proposal, RefinementMethod, StepInput, make_proposal
from refiners.methods.coordinate import dedupe


def keyword_pull(inp: StepInput) -> torch.Tensor:
    """(m, d) gradient of sum over missing keywords of max_i cos(e_i, E[keyword]), times its weight."""
    pull = torch.zeros_like(inp.embeds)
    weight = inp.weights.get("keywords", 0.0)
    if not weight or not len(inp.body):
        return pull
    e = inp.embeds
    e_norm = e.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    for kw in inp.missing_keywords:
        spellings = inp.vocab.keyword_spellings(kw)
        if not spellings:
            continue
        k = inp.vocab.embedding[spellings[0][0]]
        cos = (e @ k) / (e_norm.squeeze(-1) * k.norm().clamp(min=1e-6))
        i = int(cos.argmax())
        # d cos(e, k) / d e = k / (|e| |k|) - cos * e / |e|^2
        pull[i] += weight * (k / (e_norm[i] * k.norm()) - cos[i] * e[i] / e_norm[i] ** 2)
    return pull


def project(inp: StepInput, embeds: torch.Tensor) -> list[int]:
    """Nearest allowed token (L2) for each row of ``embeds`` (m, d)."""
    table = inp.vocab.embedding
    # |E_v - e|^2 = |E_v|^2 - 2 E_v . e + |e|^2; the last term does not change the argmin.
    distance = (table * table).sum(-1)[None] - 2 * embeds @ table.T  # (m, V)
    distance[:, ~inp.vocab.allowed] = float("inf")
    return distance.argmin(-1).tolist()


class GradientMethod(RefinementMethod):
    """Take one step of size eta along the gradient, project to tokens, keep only if better."""

    name = "gradient"

    def propose(
        self, inp: StepInput, budget: int, shortlisted: Sequence[Proposal] | None = None
    ) -> list[Proposal]:
        m = len(inp.body)
        if not m:
            return []
        direction = inp.grad + keyword_pull(inp)  # (m, d)
        scale = direction.norm(dim=-1).max().clamp(min=1e-12)
        radius = inp.vocab.embedding.norm(dim=-1).mean()
        out = []
        for k in range(budget):
            eta = inp.config.step_size * 2.0 ** (k - 2)  # eta/4, eta/2, eta, 2 eta, ...
            tokens = project(inp, inp.embeds + eta * radius * direction / scale)
            edits = [
                Edit("replace", i, (old,), (new,))
                for i, (old, new) in enumerate(zip(inp.body, tokens))
                if old != new
            ]
            if edits:
                out.append(make_proposal(inp, edits, -float(k)))
            if len(edits) == m:  # every position moved: larger steps only move further away
                break
        return dedupe(out, inp.body, budget)
