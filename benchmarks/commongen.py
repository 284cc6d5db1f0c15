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
# The frozen held-out slice: the last 200 concept sets of the dev file (indices 793-992). Defaults and
# search constants were tuned on sets 0-399 (TUNING); figures are reported on HELD_OUT, which no
# tuning reads.
TUNING = range(0, 400)
HELD_OUT = range(793, 993)
SLICES = {"tuning": TUNING, "held-out": HELD_OUT}
# The prompt of a base model: a base model continues text, so it is shown the task once.
PLAIN_PROMPT = (
    "Write one short sentence that uses all of the given words.\n\n"
    "Words: dog, frisbee, park\nSentence: A dog catches a frisbee in the park.\n\n"
    "Words: {concepts}\nSentence:"
)
PLAIN_STOP = ("\n",)
_POS_SUFFIX = re.compile(r"_[A-Z]+$")  # "look_V" -> "look"


def default_data_path() -> Path:
    """``$REFINER_COMMONGEN_PATH``, else ``<repo>/../shared/data/commongen/dev.jsonl``."""
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared/data/commongen/dev.jsonl"


@dataclass(frozen=True)
class ConceptSet:
    """One benchmark item: its index in the file, its concepts (part-of-speech suffix removed) and the
    human-written sentences that use them (``scene``)."""

    index: int
    concepts: tuple[str, ...]
    references: tuple[str, ...] = ()

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
                row = json.loads(line)
                concepts = parse_concepts(row["concept_set"])
                sets.append(ConceptSet(len(sets), concepts, tuple(row.get("scene", ()))))
    return sets


def load_slice(name: str, limit: int | None = None, path: str | Path | None = None) -> list[ConceptSet]:
    """The first ``limit`` concept sets (all when None) of the slice ``name`` ("tuning" or "held-out")."""
    indices = SLICES[name]
    items = load_concept_sets(indices.stop, path)[indices.start :]
    return items[:limit] if limit is not None else items


def prompt_ids(tokenizer: PreTrainedTokenizerBase, item: ConceptSet) -> list[int]:
    """Token ids of the prompt for ``item``: the user turn in the chat template with the assistant
    header, or, for a base model without a template (Gemma 3 270M), ``PLAIN_PROMPT``: one example
    (not from CommonGen) then the concepts, as plain text with the tokenizer's BOS; generation should
    stop at the end of the line (``PLAIN_STOP``)."""
    if not tokenizer.chat_template:
        text = PLAIN_PROMPT.format(concepts=", ".join(item.concepts))
        return [int(i) for i in tokenizer(text)["input_ids"]]
    messages = [{"role": "user", "content": item.instruction}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def concept_coverage(concepts: Sequence[str], text: str) -> float:
    """Fraction of ``concepts`` present in ``text``, by the refiner's own matcher
    (``refiners.keywords.keyword_present``, through ``refiners.keywords.coverage``)."""
    return coverage(tuple(concepts), text)


def prompt_text(tokenizer: PreTrainedTokenizerBase, item: ConceptSet) -> str:
    """The ``inputs`` text of ``POST /generate`` that the server encodes to ``prompt_ids``: the chat
    template's text (its special tokens written out), or the plain prompt (the server adds the BOS)."""
    if not tokenizer.chat_template:
        return PLAIN_PROMPT.format(concepts=", ".join(item.concepts))
    return tokenizer.decode(prompt_ids(tokenizer, item))
