"""Pieces every protocol's routes share: the refinement report and server-sent events."""

from __future__ import annotations

import json
from typing import Any

from app.engine import JobResult
from app.schemas import Refinement


def refinement_of(result: JobResult) -> Refinement | None:
    """The ``refinement`` object of an answer; None when the request asked for plain generation."""
    r = result.refinement
    if r is None:
        return None
    return Refinement(
        method=r.method,
        initial_text=r.initial_text,
        refined_text=r.refined_text,
        objective_before=dict(r.objective_before),
        objective_after=dict(r.objective_after),
        edits=[dict(e) for e in r.edits],
        candidates_scored=r.candidates_scored,
        generate_seconds=result.generate_seconds,
        refine_seconds=result.refine_seconds,
        gradient_seconds=r.gradient_seconds,
        scoring_seconds=r.scoring_seconds,
        steps=r.steps,
        improved=r.improved,
    )


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
