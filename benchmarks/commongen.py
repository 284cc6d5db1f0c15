"""CommonGen concept sets as benchmark prompts, and concept coverage.

Each line of the CommonGen dev file holds ``{"concept_set": "field_N#look_V#stand_V", ...}``. A concept
set becomes the user message "Write one short sentence that uses all of these words: field, look,
stand." in the model's chat template. Coverage is decided by ``refiners.keywords.keyword_present``,
the same matcher the keyword-coverage objective term uses, so the benchmark and the refiner agree on
what "contains the word" means.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from refiners.keywords import coverage

DATA_ENV = "REFINER_COMMONGEN_PATH"
DEFAULT_LIMIT = 200
_POS_SUFFIX = re.compile(r"_[A-Z]+$")  # "look_V" -> "look"


def default_data_path() -> Path:
    """``$REFINER_COMMONGEN_PATH``, else ``<repo>/../shared/data/commongen/dev.jsonl``."""
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared/data/commongen/dev.jsonl"


@dataclass(frozen=True)
class ConceptSet:
    """One benchmark item: its index in the file and its concepts (part-of-speech suffix removed)."""

    index: int
    concepts: tuple[str, ...]

    @property
    def instruction(self) -> str:
        return f"Write one short sentence that uses all of these words: {', '.join(self.concepts)}."


def parse_concepts(concept_set: str) -> tuple[str, ...]:
    """``"field_N#look_V#stand_V"`` -> ``("field", "look", "stand")``."""
    return tuple(_POS_SUFFIX.sub("", c.strip()) for c in concept_set.split("#") if c.strip())


def load_concept_sets(limit: int = DEFAULT_LIMIT, path: str | Path | None = None) -> list[ConceptSet]:
    """The first ``limit`` concept sets of the CommonGen file (in file order)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    path = Path(path) if path else default_data_path()
    if not path.is_file():
        raise FileNotFoundError(f"CommonGen data not found at {path}: set {DATA_ENV} to the dev.jsonl file")
    sets: list[ConceptSet] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(sets) >= limit:
                break
            if line.strip():
                sets.append(ConceptSet(len(sets), parse_concepts(json.loads(line)["concept_set"])))
    return sets


def prompt_ids(tokenizer: PreTrainedTokenizerBase, item: ConceptSet) -> list[int]:
    """Token ids of the chat-templated prompt (user turn + generation prompt) for ``item``."""
    messages = [{"role": "user", "content": item.instruction}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def concept_coverage(concepts: Sequence[str], text: str) -> float:
    """Fraction of ``concepts`` present in ``text``, by the refiner's own matcher
    (``refiners.keywords.keyword_present``, through ``refiners.keywords.coverage``)."""
    return coverage(tuple(concepts), text)
