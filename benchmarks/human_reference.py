"""How the judge reads the sentences people wrote, beside a finished quality run's texts.

Issue 14 bounds the judge's median perplexity of refined outputs at +3% of the greedy outputs'. This
puts the greedy and refined texts of a ``benchmarks.quality`` run (its ``.records.jsonl``) beside the
human sentences CommonGen gives for the same concept sets (``scene``; the first one of each set), all
read by the same judge: coverage, the share of sets with every concept, the judge's median perplexity
and its change against greedy with a 95% bootstrap interval over the sets. It reads a finished run and
tunes nothing.

    python -m benchmarks.human_reference \\
        --records benchmarks/results/quality-held-out-200-smollm2-session20.records.jsonl \\
        --out benchmarks/results/human-reference-smollm2.json
    # Gemma's outputs are judged by SmolLM2: add --judge smollm2
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.commongen import concept_coverage, load_concept_sets
from benchmarks.report import (
    RESULTS_DIR,
    Column,
    bootstrap_interval,
    markdown_table,
    median_change_pct,
    write_json,
)

HUMAN = "human (first sentence)"
BASELINE = "greedy"

TABLE = [
    Column("condition", "condition"),
    Column("sets", "n"),
    Column("coverage", "coverage", ".1%"),
    Column("every_concept", "every concept", ".1%"),
    Column("judge_ppl_median", "judge ppl (median)", ".1f"),
    Column("ppl_vs_greedy_pct", "vs greedy %", "+.1f"),
    Column("ppl_vs_greedy_ci", "95% CI"),
]


def read_texts(
    records: Path, data: str | Path | None = None
) -> tuple[list[tuple[str, ...]], dict[str, list[str]]]:
    """(each set's concepts, {condition: one text per set}) from a quality run's records, with each
    set's first human sentence as the condition ``HUMAN``; sets without one are left out."""
    items = [json.loads(line) for line in records.open(encoding="utf-8") if line.strip()]
    items = [i for i in items if i.get("kind") == "item"]
    sets = load_concept_sets(max(i["index"] for i in items) + 1, data)
    items = [i for i in items if sets[i["index"]].references]
    texts: dict[str, list[str]] = {}
    for item in items:
        for condition, record in item["records"].items():
            texts.setdefault(condition, []).append(record["text"])
        texts.setdefault(HUMAN, []).append(sets[item["index"]].references[0])
    complete = {c: t for c, t in texts.items() if len(t) == len(items)}
    return [sets[i["index"]].concepts for i in items], complete


def summarise(
    concepts: Sequence[tuple[str, ...]],
    texts: dict[str, list[str]],
    perplexity: Callable[[list[str]], list[float]],
) -> list[dict]:
    """One row per condition; every text is read once by ``perplexity`` (the judge)."""
    distinct = sorted({t for ts in texts.values() for t in ts})
    ppl = dict(zip(distinct, perplexity(distinct), strict=True))
    base = np.array([ppl[t] for t in texts[BASELINE]])
    rows = []
    for condition, ts in texts.items():
        cov = [concept_coverage(c, t) for c, t in zip(concepts, ts, strict=True)]
        pairs = np.stack([base, [ppl[t] for t in ts]], axis=1)
        pairs = pairs[~np.isnan(pairs).any(1)]
        low, high = bootstrap_interval(pairs, median_change_pct)  # resamples rows: sets stay paired
        rows.append(
            {
                "condition": condition,
                "sets": len(ts),
                "coverage": float(np.mean(cov)),
                "every_concept": float(np.mean([c == 1 for c in cov])),
                "judge_ppl_median": float(np.median(pairs[:, 1])),
                "ppl_vs_greedy_pct": median_change_pct(pairs),
                "ppl_vs_greedy_ci": f"[{low:+.1f}, {high:+.1f}]",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=Path, required=True, help="a benchmarks.quality .records.jsonl")
    parser.add_argument("--judge", default="gemma3", help="gemma3 (judges SmolLM2) or smollm2 (judges Gemma)")
    parser.add_argument("--data", default=None, help="CommonGen dev.jsonl (default: REFINER_COMMONGEN_PATH)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "human-reference.json")
    args = parser.parse_args(argv)
    from benchmarks.judge import load_judge

    concepts, texts = read_texts(args.records, args.data)
    rows = summarise(concepts, texts, load_judge(args.judge).perplexity)
    print(markdown_table(rows, TABLE))
    write_json(args.out, {"records": str(args.records), "judge": args.judge, "summary": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
