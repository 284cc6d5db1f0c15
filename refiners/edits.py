"""Token edits proposed by a refinement method, and how to apply them to an output."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

EditOp = Literal["replace", "insert", "delete"]


@dataclass(frozen=True)
class Edit:
    """One edit of the output token sequence.

    Args:
        op: "replace" (tokens at ``position`` .. ``position + len(old_tokens)`` become ``new_tokens``),
            "insert" (``new_tokens`` go in before ``position``; ``old_tokens`` is empty) or
            "delete" (``old_tokens`` at ``position`` are removed; ``new_tokens`` is empty).
        position: index into the output token ids (0 = first generated token), in the sequence the
            edit was proposed for.
        old_tokens: token ids removed.
        new_tokens: token ids added (a keyword may need several).
    """

    op: EditOp
    position: int
    old_tokens: tuple[int, ...] = ()
    new_tokens: tuple[int, ...] = ()

    @property
    def span(self) -> tuple[int, int]:
        """Half-open range of output positions the edit touches (an insertion touches its gap)."""
        return self.position, self.position + max(len(self.old_tokens), 1)

    def overlaps(self, other: Edit) -> bool:
        a0, a1 = self.span
        b0, b1 = other.span
        return a0 < b1 and b0 < a1

    def to_dict(self) -> dict:
        return asdict(self)


def apply_edits(ids: list[int], edits: list[Edit]) -> list[int]:
    """Apply non-overlapping edits (positions refer to ``ids``) and return the new id list."""
    out = list(ids)
    # Right to left, so earlier positions stay valid.
    for e in sorted(edits, key=lambda e: e.position, reverse=True):
        end = e.position + len(e.old_tokens)
        if tuple(out[e.position : end]) != tuple(e.old_tokens):
            raise ValueError(f"edit {e} does not match the sequence at position {e.position}")
        out[e.position : end] = list(e.new_tokens)
    return out
