"""Reference benchmark: does one step with a reference text move an output towards it, and at what
cost in fluency?

For each CommonGen concept set of a slice (``benchmarks.commongen.SLICES``), the embedded model's
greedy answer to the quality benchmark's prompt (32 new tokens) is refined by one step with the set's
first human-written sentence as ``reference``:

- ``+ reference (w=W)``: the default objective (no keywords) plus the reference term at weight W, for each
  ``--weights``;
- ``+ reference alone``: the reference term only (``logprob`` and ``fluency`` weights 0).

Per condition: the word edit distance to the reference over its length (lower case, punctuation as
words), before and after, with a 95% bootstrap interval of the mean change; the share of outputs that
came closer and that went farther; the judge's perplexity (Gemma 3 270M, ``benchmarks.judge``), as the
median of the per-output after / before ratios with its interval; the share whose objective went down
(must be 0); refine time over generation time.

    python -m benchmarks.reference --slice tuning --limit 40 --weights 4 8 16   # choose the weight
    python -m benchmarks.reference --slice held-out --limit 100                 # report it
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein

from benchmarks.commongen import SLICES, ConceptSet, load_slice, prompt_ids
from benchmarks.report import RESULTS_DIR, Column, bootstrap_interval, markdown_table, mean, write_json
from refiners import DEFAULT_WEIGHTS, RefineConfig, Refiner, RefineRequest
from refiners.generation import BatchGenerator, SamplingParams
from refiners.models import LoadedModel

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 32
ALONE = "+ reference alone"

TABLE = [
    Column("condition", "condition"),
    Column("prompts", "n"),
    Column("distance_before", "dist. before", ".3f"),
    Column("distance_after", "dist. after", ".3f"),
    Column("distance_change", "change", "+.3f"),
    Column("distance_change_ci", "95% CI"),
    Column("closer_frac", "closer", ".0%"),
    Column("farther_frac", "farther", ".0%"),
    Column("ppl_ratio", "judge ppl x", ".3f"),
    Column("ppl_ratio_ci", "95% CI"),
    Column("objective_down_frac", "obj. down", ".0%"),
    Column("refine_over_generate", "refine/gen", ".2f"),
]


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def distance(text: str, reference: str) -> float:
    """Word edit distance from ``text`` to ``reference``, over the reference's length in words."""
    return Levenshtein.distance(words(text), words(reference)) / max(1, len(words(reference)))


def conditions(weights: Sequence[float]) -> dict[str, dict[str, float]]:
    """{condition name: refine.weights} of the run."""
    out = {f"+ reference (w={w:g})": {"reference": w} for w in weights}
    out[ALONE] = {"logprob": 0.0, "fluency": 0.0}
    return out


def run_item(
    loaded: LoadedModel, refiner: Refiner, item: ConceptSet, weights: Sequence[float]
) -> dict[str, Any]:
    """The greedy output of one concept set and its refinement under every condition."""
    prompt, reference = prompt_ids(loaded.tokenizer, item), item.references[0]
    started = time.perf_counter()
    [out] = BatchGenerator(loaded).generate(
        [prompt], [SamplingParams(max_new_tokens=MAX_NEW_TOKENS)], keep_prompt_cache=True
    )
    record: dict[str, Any] = {"index": item.index, "reference": reference, "initial": out.text}
    record["generate_s"] = time.perf_counter() - started
    for name, w in conditions(weights).items():
        config = RefineConfig(reference=reference, weights=w)
        started = time.perf_counter()
        [result] = refiner.refine([RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)])
        record[name] = {
            "text": result.refined_text,
            "refine_s": time.perf_counter() - started,
            "objective_before": result.objective_before["total"],
            "objective_after": result.objective_after["total"],
        }
    return record


def summarise(
    records: list[dict[str, Any]], names: Sequence[str], ppl: dict[str, float]
) -> list[dict[str, Any]]:
    """One table row per condition (see the module doc)."""
    rows = []
    for name in names:
        before = [distance(r["initial"], r["reference"]) for r in records]
        after = [distance(r[name]["text"], r["reference"]) for r in records]
        change = [a - b for a, b in zip(after, before)]
        ratio = [ppl[r[name]["text"]] / ppl[r["initial"]] for r in records]
        low, high = bootstrap_interval(change, np.mean)
        ppl_low, ppl_high = bootstrap_interval(ratio, np.median)
        rows.append(
            {
                "condition": name,
                "prompts": len(records),
                "distance_before": mean(before),
                "distance_after": mean(after),
                "distance_change": mean(change),
                "distance_change_ci": f"[{low:+.3f}, {high:+.3f}]",
                "closer_frac": mean([float(c < 0) for c in change]),
                "farther_frac": mean([float(c > 0) for c in change]),
                "ppl_ratio": statistics.median(ratio),
                "ppl_ratio_ci": f"[{ppl_low:.3f}, {ppl_high:.3f}]",
                "objective_down_frac": mean(
                    [float(r[name]["objective_after"] < r[name]["objective_before"] - 1e-4) for r in records]
                ),
                "refine_over_generate": sum(r[name]["refine_s"] for r in records)
                / sum(r["generate_s"] for r in records),
            }
        )
    return rows


def run(
    loaded: LoadedModel,
    refiner: Refiner,
    perplexity: Callable[[list[str]], list[float]],
    items: Sequence[ConceptSet],
    weights: Sequence[float],
) -> dict[str, Any]:
    """Every condition on every item, then the judge over every distinct text."""
    records = []
    for item in items:
        records.append(run_item(loaded, refiner, item, weights))
        log.info("item %d: %r -> %r", item.index, records[-1]["initial"], records[-1][ALONE]["text"])
    names = list(conditions(weights))
    texts = sorted({r["initial"] for r in records} | {r[n]["text"] for r in records for n in names})
    ppl = dict(zip(texts, perplexity(texts)))
    return {"summary": summarise(records, names, ppl), "records": records, "weights": list(weights)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reference benchmark on CommonGen (see the module doc).")
    parser.add_argument("--slice", choices=list(SLICES), default="held-out")
    parser.add_argument("--limit", type=int, default=100, help="first N concept sets of the slice")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[DEFAULT_WEIGHTS["reference"]], help="reference weights"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "reference.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.judge import load_judge
    from refiners.models import load_model

    loaded = load_model(device="cpu")
    items = load_slice(args.slice, args.limit)
    judge: dict[str, Any] = {}

    def perplexity(texts: list[str]) -> list[float]:
        judge.setdefault("judge", load_judge())  # loaded once generation is over
        return judge["judge"].perplexity(texts)

    result = run(loaded, Refiner(loaded), perplexity, items, args.weights)
    result.update(model=loaded.model_id, slice=args.slice, items=[i.index for i in items])
    write_json(args.out, result)
    title = (
        f"CommonGen {args.slice} slice, {len(items)} concept sets, {loaded.model_id}, reference = scene[0]"
    )
    print(f"\n{title}\n\n{markdown_table(result['summary'], TABLE)}\n\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
