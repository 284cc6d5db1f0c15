"""Quality benchmark: does one refinement step make CommonGen outputs cover more concepts, without
making them less fluent, at what cost in time?

For the first N CommonGen concept sets of a slice (``--slice tuning``: sets 0-399, where defaults are
tuned; ``--slice held-out``: sets 793-992, which no tuning reads; see ``benchmarks.commongen``), with each
model of ``--models`` in-process (the embedded SmolLM2 by default; ``embedded:gemma3-270m``, a base
model, gets the instruction as plain text):

- ``greedy`` and ``sampled`` (temperature 0.7, seed = the item's index) initial outputs, 32 new tokens;
- each refined by one step of every method (``<initial> + <method>``), keywords = the concepts;
- ``best_of=N``: N sampled outputs (seeds index, index + 1, ...; generated in one batch, as the server
  does) reranked by ``Refiner.score`` with the same objective, N chosen so that its wall time matches
  generate + coordinate refine: N = round(mean greedy generate+refine time / mean sampled generation
  time), at least 2.

Per condition: concept coverage (``refiners.keywords`` matcher), mean objective total (rescored with
``Refiner.score`` on the final ids), the share of sets with every concept, median perplexity under the
independent judge (Gemma 3 270M for SmolLM2, SmolLM2 for Gemma: see ``benchmarks.judge``), wall time per
prompt, refine time / generation time (mean of per-prompt ratios
and ratio of sums). Per refined condition against its initial outputs: the fraction of prompts whose
objective went down (must be 0), the coverage gain and the gain in sets with every concept in points,
the change of the judge's median perplexity, with 95% bootstrap intervals (resampling concept sets),
and the accepted edits by kind. "Went down" is judged two ways:
rescoring both outputs as generated with ``Refiner.score`` ("obj. down", what a client sees), and
from the refiner's own before/after ("obj. down (refiner's)"). They differ only for an initial output
whose token ids do not survive decode-then-encode: the refiner scores the re-encoded text (the column
"init. not canonical" counts them).

Prompts are processed one at a time (batch size 1) so the times are per request. Per-prompt records are
appended to ``<out>.records.jsonl`` as they are produced; ``--resume`` skips the prompts already there.

    python -m benchmarks.quality --limit 20                  # quick run while tuning
    python -m benchmarks.quality                             # the first 200 tuning sets (make bench-quality)
    python -m benchmarks.quality --slice held-out --limit 100 --methods coordinate \
        --models embedded:smollm2-135m-instruct embedded:gemma3-270m   # the reported figures
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.commongen import (
    DEFAULT_LIMIT,
    PLAIN_STOP,
    SLICES,
    ConceptSet,
    concept_coverage,
    load_slice,
    prompt_ids,
)
from benchmarks.report import (
    RESULTS_DIR,
    Column,
    bootstrap_interval,
    markdown_table,
    mean,
    median_change_pct,
    plot_quality,
    write_json,
)
from refiners import DEFAULT_WEIGHTS, METHODS, RefineConfig, Refiner, RefineRequest
from refiners.generation import BatchGenerator, SamplingParams
from refiners.models import EMBEDDED_GEMMA, EMBEDDED_MODEL, LoadedModel

log = logging.getLogger(__name__)

INITIALS = ("greedy", "sampled")
TEMPERATURE = 0.7
MAX_NEW_TOKENS = 32
EDIT_KINDS = ("insert", "replace", "delete")
# Objective values are floats from two forward passes; a "decrease" must exceed their noise.
OBJECTIVE_TOLERANCE = 1e-4


@dataclass
class QualitySettings:
    """What one quality run does.

    Args:
        methods: refinement methods to run on every initial output.
        max_new_tokens: length budget of every generated output.
        best_of: N of the best_of condition; None = chosen from the measured times (see module doc).
        candidates: candidates per refinement step (None = ``RefineConfig`` default).
        stop: stop sequences of every generation (a base model's prompt ends its line).
        weights: term weights that differ from the defaults (to compare a change of defaults).
    """

    methods: tuple[str, ...] = tuple(METHODS)
    max_new_tokens: int = MAX_NEW_TOKENS
    best_of: int | None = None
    candidates: int | None = None
    stop: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)

    def refine_config(self, item: ConceptSet, method: str) -> RefineConfig:
        extra = {"candidates": self.candidates} if self.candidates else {}
        return RefineConfig(
            method=method, keywords=item.concepts, stop=self.stop, weights=self.weights, **extra
        )

    def params(self, initial: str, seed: int) -> SamplingParams:
        if initial == "greedy":
            return SamplingParams(max_new_tokens=self.max_new_tokens, stop=self.stop)
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=True,
            temperature=TEMPERATURE,
            seed=seed,
            stop=self.stop,
        )


class QualityRun:
    """Runs the conditions on concept sets and keeps one record per (item, condition).

    Args:
        loaded: the model that generates and is refined.
        refiner: a ``Refiner`` over ``loaded``.
        settings: methods, lengths and best_of.
    """

    def __init__(self, loaded: LoadedModel, refiner: Refiner, settings: QualitySettings):
        self.loaded = loaded
        self.refiner = refiner
        self.generator = BatchGenerator(loaded)
        self.settings = settings

    def _objective(self, prompt: list[int], ids: list[int], item: ConceptSet) -> float:
        # The objective does not depend on the method; any method's config scores the same.
        config = self.settings.refine_config(
            item, self.settings.methods[0] if self.settings.methods else "coordinate"
        )
        return self.refiner.score(prompt, [ids], config)[0]["total"]

    def _round_trips(self, ids: Sequence[int]) -> bool:
        """Whether decode-then-encode gives back ``ids`` (without a final EOS). The refiner scores the
        re-encoded text, so for an output that does not round-trip its "before" differs from ours."""
        tok = self.loaded.tokenizer
        body = list(ids[:-1]) if ids and ids[-1] in self.loaded.eos_token_ids else list(ids)
        return tok.encode(tok.decode(body, skip_special_tokens=True), add_special_tokens=False) == body

    def run_item(self, item: ConceptSet) -> dict[str, dict[str, Any]]:
        """Every non-best_of condition on one concept set: {condition: record}."""
        prompt = prompt_ids(self.loaded.tokenizer, item)
        records: dict[str, dict[str, Any]] = {}
        for initial in INITIALS:
            started = time.perf_counter()
            # As the server does: generation keeps the prompt's KV cache for the refiner.
            [out] = self.generator.generate(
                [prompt], [self.settings.params(initial, seed=item.index)], keep_prompt_cache=True
            )
            gen_s = time.perf_counter() - started
            before = self._objective(prompt, out.token_ids, item)
            records[initial] = _record(
                item,
                out.text,
                out.token_ids,
                gen_s,
                0.0,
                before,
                finish_reason=out.finish_reason,
                round_trips=self._round_trips(out.token_ids),
            )
            for method in self.settings.methods:
                started = time.perf_counter()
                [res] = self.refiner.refine(
                    [
                        RefineRequest(
                            prompt,
                            list(out.token_ids),
                            self.settings.refine_config(item, method),
                            out.prompt_cache,
                        )
                    ]
                )
                refine_s = time.perf_counter() - started
                after = self._objective(prompt, res.refined_ids, item)
                records[f"{initial} + {method}"] = _record(
                    item,
                    res.refined_text,
                    res.refined_ids,
                    gen_s,
                    refine_s,
                    after,
                    initial=initial,
                    initial_objective=before,
                    reported_before=res.objective_before["total"],
                    reported_after=res.objective_after["total"],
                    edits=[{k: e[k] for k in ("op", "old_text", "new_text") if k in e} for e in res.edits],
                    candidates_scored=res.candidates_scored,
                )
        return records

    def run_best_of(self, item: ConceptSet, n: int) -> dict[str, Any]:
        """The best_of=n condition on one concept set: n samples in one batch, best by the objective."""
        prompt = prompt_ids(self.loaded.tokenizer, item)
        params = [self.settings.params("sampled", seed=item.index + k) for k in range(n)]
        started = time.perf_counter()
        outs = self.generator.generate([prompt] * n, params)
        gen_s = time.perf_counter() - started
        started = time.perf_counter()
        method = self.settings.methods[0] if self.settings.methods else "coordinate"
        scores = self.refiner.score(
            prompt, [o.token_ids for o in outs], self.settings.refine_config(item, method)
        )
        rank_s = time.perf_counter() - started
        best = max(range(n), key=lambda k: scores[k]["total"])
        return _record(
            item,
            outs[best].text,
            outs[best].token_ids,
            gen_s,
            rank_s,
            scores[best]["total"],
            best_of=n,
            finish_reason=outs[best].finish_reason,
        )


def _record(
    item: ConceptSet,
    text: str,
    ids: Sequence[int],
    gen_s: float,
    refine_s: float,
    objective: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "index": item.index,
        "concepts": list(item.concepts),
        "text": text,
        "ids": [int(i) for i in ids],
        "tokens": len(ids),
        "coverage": concept_coverage(item.concepts, text),
        "generate_s": gen_s,
        "refine_s": refine_s,
        "objective": objective,
        **extra,
    }


def choose_best_of(records: dict[int, dict[str, dict[str, Any]]], methods: Sequence[str]) -> int:
    """N so that best_of=N costs about generate + refine: mean(greedy gen + refine) / mean(sampled gen)."""
    method = "coordinate" if "coordinate" in methods else (methods[0] if methods else None)
    if method is None:
        return 2
    refined = [r[f"greedy + {method}"] for r in records.values() if f"greedy + {method}" in r]
    sampled = [r["sampled"]["generate_s"] for r in records.values() if "sampled" in r]
    if not refined or not sampled:
        return 2
    budget = mean([r["generate_s"] + r["refine_s"] for r in refined])
    return max(2, round(budget / mean(sampled)))


def summarise(by_condition: dict[str, list[dict[str, Any]]], ppl: dict[str, float]) -> list[dict[str, Any]]:
    """One summary row per condition (in run order), refined conditions compared with their initial."""
    rows = []
    for name, recs in by_condition.items():
        ratios = [r["refine_s"] / r["generate_s"] for r in recs if r["generate_s"] > 0]
        gen_sum = sum(r["generate_s"] for r in recs)
        row: dict[str, Any] = {
            "condition": name,
            "prompts": len(recs),
            "coverage": mean([r["coverage"] for r in recs]),
            "all_concepts": mean([float(r["coverage"] == 1) for r in recs]),
            "objective_mean": mean([r["objective"] for r in recs]),
            "judge_ppl_median": _median([ppl.get(r["text"], math.nan) for r in recs]),
            "tokens_mean": mean([r["tokens"] for r in recs]),
            "wall_s_per_prompt": mean([r["generate_s"] + r["refine_s"] for r in recs]),
            "generate_s_mean": mean([r["generate_s"] for r in recs]),
            "refine_s_mean": mean([r["refine_s"] for r in recs]),
            "time_ratio_mean": mean(ratios) if ratios else math.nan,
            "time_ratio_of_sums": sum(r["refine_s"] for r in recs) / gen_sum if gen_sum > 0 else math.nan,
        }
        initial = recs[0].get("initial") if recs else None
        if initial and initial in by_condition:
            base = {r["index"]: r for r in by_condition[initial]}
            pairs = [(base[r["index"]], r) for r in recs if r["index"] in base]
            row["vs"] = initial
            row["objective_decreased_frac"] = mean(
                [float(r["objective"] < b["objective"] - OBJECTIVE_TOLERANCE) for b, r in pairs]
            )
            row["objective_decreased_reported_frac"] = mean(
                [float(r["reported_after"] < r["reported_before"] - OBJECTIVE_TOLERANCE) for _, r in pairs]
            )
            row["initial_not_round_trip_frac"] = mean(
                [float(not b.get("round_trips", True)) for b, _ in pairs]
            )
            row["changed_frac"] = mean([float(r["ids"] != b["ids"]) for b, r in pairs])
            row.update(_gains(pairs, ppl))
            for op in EDIT_KINDS:
                row[f"edits_{op}"] = sum(e["op"] == op for _, r in pairs for e in r.get("edits", []))
        rows.append(row)
    return rows


def _gains(pairs: list[tuple[dict, dict]], ppl: dict[str, float]) -> dict[str, Any]:
    """Coverage gain, gain in sets with every concept and the judge's median perplexity change of
    (initial, refined) record pairs, with 95% bootstrap intervals (resampling the concept sets)."""
    diffs = np.array(
        [
            [r["coverage"] - b["coverage"], float(r["coverage"] == 1) - float(b["coverage"] == 1)]
            for b, r in pairs
        ]
    )
    ppls = np.array([[ppl.get(b["text"], math.nan), ppl.get(r["text"], math.nan)] for b, r in pairs])
    ppls = ppls[~np.isnan(ppls).any(1)]

    def interval(values: np.ndarray, statistic: Callable[[np.ndarray], float]) -> str:
        low, high = bootstrap_interval(
            list(range(len(values))), lambda idx: statistic(values[idx.astype(int)])
        )
        return f"[{low:+.1f}, {high:+.1f}]"

    return {
        "coverage_gain_points": 100 * float(diffs[:, 0].mean()),
        "coverage_gain_ci": interval(diffs[:, 0], lambda v: 100 * float(v.mean())),
        "all_concepts_gain_points": 100 * float(diffs[:, 1].mean()),
        "judge_ppl_change_pct": median_change_pct(ppls) if len(ppls) else math.nan,
        "judge_ppl_change_ci": interval(ppls, median_change_pct) if len(ppls) else "-",
    }


def _median(values: Sequence[float]) -> float:
    xs = [v for v in values if not math.isnan(v)]  # a text with no tokens has no perplexity
    return statistics.median(xs) if xs else math.nan


TABLE = [
    Column("condition", "condition"),
    Column("prompts", "n"),
    Column("coverage", "coverage", ".1%"),
    Column("coverage_gain_points", "gain (pts)", "+.1f"),
    Column("coverage_gain_ci", "95% CI"),
    Column("all_concepts", "every concept", ".0%"),
    Column("all_concepts_gain_points", "gain (pts)", "+.1f"),
    Column("objective_mean", "objective", ".3f"),
    Column("objective_decreased_frac", "obj. down", ".0%"),
    Column("objective_decreased_reported_frac", "obj. down (refiner's)", ".0%"),
    Column("initial_not_round_trip_frac", "init. not canonical", ".0%"),
    Column("changed_frac", "changed", ".0%"),
    Column("judge_ppl_median", "judge ppl (median)", ".1f"),
    Column("judge_ppl_change_pct", "ppl change %", "+.1f"),
    Column("judge_ppl_change_ci", "95% CI"),
    *(Column(f"edits_{op}", op) for op in EDIT_KINDS),
    Column("tokens_mean", "tokens", ".1f"),
    Column("wall_s_per_prompt", "wall s/prompt", ".2f"),
    Column("time_ratio_mean", "refine/gen (mean)", ".2f"),
    Column("time_ratio_of_sums", "refine/gen (sums)", ".2f"),
]


def _load_records(path: Path, settings: QualitySettings) -> tuple[dict[int, dict], dict[int, dict]]:
    """Records of an earlier run with the same settings: ({index: {condition: record}}, {index: best_of})."""
    items: dict[int, dict] = {}
    best: dict[int, dict] = {}
    if not path.is_file():
        return items, best
    key = _settings_key(settings)
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("settings") != key:
            continue
        if entry["kind"] == "item":
            items[entry["index"]] = entry["records"]
        else:
            best[entry["index"]] = entry["record"]
    return items, best


def _settings_key(settings: QualitySettings) -> dict[str, Any]:
    """What a record depends on, defaults resolved (a record made under other defaults is not reused)."""
    return {
        "methods": list(settings.methods),
        "max_new_tokens": settings.max_new_tokens,
        "candidates": settings.candidates or RefineConfig().candidates,
        "weights": {**DEFAULT_WEIGHTS, **settings.weights},
    }


def run(
    loaded: LoadedModel,
    refiner: Refiner,
    perplexity: Callable[[list[str]], list[float]],
    items: Sequence[ConceptSet],
    settings: QualitySettings,
    records_path: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every condition on ``items``, then judge all final texts; return the summary and records.

    ``perplexity`` is the judge (``Judge.perplexity``); it is called once, after all generation, on
    the distinct final texts.
    """
    bench = QualityRun(loaded, refiner, settings)
    done, best_done = _load_records(records_path, settings) if (records_path and resume) else ({}, {})
    if records_path and not resume and records_path.exists():
        records_path.unlink()
    key = _settings_key(settings)

    def append(entry: dict[str, Any]) -> None:
        if records_path:
            records_path.parent.mkdir(parents=True, exist_ok=True)
            with records_path.open("a") as f:
                f.write(json.dumps({**entry, "settings": key}) + "\n")

    per_item: dict[int, dict[str, dict[str, Any]]] = {}
    for item in items:
        if item.index in done:
            per_item[item.index] = done[item.index]
            continue
        per_item[item.index] = bench.run_item(item)
        append({"kind": "item", "index": item.index, "records": per_item[item.index]})
        g = per_item[item.index]["greedy"]
        log.info("[%d/%d] %s -> %r", item.index + 1, len(items), ", ".join(item.concepts), g["text"])

    n = settings.best_of or choose_best_of(per_item, settings.methods)
    best_of: dict[int, dict[str, Any]] = {}
    for item in items:
        if item.index in best_done and best_done[item.index].get("best_of") == n:
            best_of[item.index] = best_done[item.index]
            continue
        best_of[item.index] = bench.run_best_of(item, n)
        append({"kind": "best_of", "index": item.index, "record": best_of[item.index]})

    by_condition: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        for name, rec in per_item[item.index].items():
            by_condition.setdefault(name, []).append(rec)
        by_condition.setdefault(f"best_of={n}", []).append(best_of[item.index])
    # Initial conditions first, then their refinements, then best_of.
    order = [c for i in INITIALS for c in by_condition if c == i or c.startswith(f"{i} + ")]
    by_condition = {c: by_condition[c] for c in [*order, f"best_of={n}"]}

    texts = sorted({r["text"] for recs in by_condition.values() for r in recs})
    started = time.perf_counter()
    ppl = dict(zip(texts, perplexity(texts), strict=True))
    log.info("judged %d distinct texts in %.1f s", len(texts), time.perf_counter() - started)
    for recs in by_condition.values():
        for r in recs:
            r["judge_ppl"] = ppl[r["text"]]
    return {
        "settings": {
            **key,
            "temperature": TEMPERATURE,
            "best_of": n,
            "prompts": len(items),
            "default_weights": DEFAULT_WEIGHTS,
        },
        "summary": summarise(by_condition, ppl),
        "records": by_condition,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--slice", choices=list(SLICES), default="tuning", help="which concept sets")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="first N concept sets of the slice")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument(
        "--candidates", type=int, default=None, help="per refinement step (default: config's)"
    )
    parser.add_argument(
        "--weights", type=json.loads, default={}, help="JSON term weights, e.g. '{\"fluency\": 0.5}'"
    )
    parser.add_argument("--best-of", type=int, default=None, help="fix N instead of matching the time")
    parser.add_argument("--data", type=Path, default=None, help="CommonGen dev.jsonl (default: shared data)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[EMBEDDED_MODEL],
        help=f"models to refine, one row group each ({EMBEDDED_MODEL}, {EMBEDDED_GEMMA}, a directory)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quality.json")
    parser.add_argument("--resume", action="store_true", help="reuse the records of an interrupted run")
    return parser


def judge_of(model: str) -> str:
    """The judge of a model's outputs: never the model itself (SmolLM2 judges Gemma, Gemma the rest)."""
    return "smollm2" if model == EMBEDDED_GEMMA else "gemma3"


def run_model(args: argparse.Namespace, model: str, items: list[ConceptSet]) -> dict[str, Any]:
    """Every condition with one model, judged by the other; its summary rows carry the model's name."""
    from benchmarks.judge import JUDGES, load_judge
    from refiners.models import load_model

    loaded = load_model(model, device="cpu")
    settings = QualitySettings(
        methods=tuple(args.methods),
        max_new_tokens=args.max_new_tokens,
        best_of=args.best_of,
        candidates=args.candidates,
        weights=args.weights,
        stop=() if loaded.tokenizer.chat_template else PLAIN_STOP,
    )
    judge_name, judge_holder = judge_of(model), {}

    def perplexity(texts: list[str]) -> list[float]:
        judge_holder.setdefault("judge", load_judge(judge_name))  # loaded only once generation is over
        return judge_holder["judge"].perplexity(texts)

    suffix = "" if model == EMBEDDED_MODEL else "." + model.replace(":", "-").replace("/", "-")
    records = args.out.with_name(args.out.stem + suffix + ".records.jsonl")
    result = run(loaded, Refiner(loaded), perplexity, items, settings, records, args.resume)
    for row in result["summary"]:
        row["model"] = model
    result.update(model=model, judge=f"{JUDGES[judge_name]}, perplexity of the sentence alone")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    items = load_slice(args.slice, args.limit, args.data)
    results = [run_model(args, model, items) for model in args.models]
    summary = [row for result in results for row in result["summary"]]
    first, last = items[0].index, items[-1].index
    title = f"CommonGen dev, {args.slice} slice (sets {first}-{last}), {args.max_new_tokens} new tokens"
    write_json(
        args.out,
        {
            "slice": args.slice,
            "items": [i.index for i in items],
            "summary": summary,
            "models": {r["model"]: r for r in results},
        },
    )
    plot_quality(args.out.with_suffix(".png"), results[0]["summary"], f"{title}, {results[0]['model']}")
    print(f"\n{title}\n")
    print(markdown_table(summary, [Column("model", "model"), *TABLE]))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
