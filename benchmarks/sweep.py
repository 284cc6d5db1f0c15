"""Side-by-side sweep of the refiner's tuning constants on held-out CommonGen items.

Each item is generated once (greedy, the server's way: the prompt cache is kept), then refined under
every setting in the same process, in turn (the order reversed every other item), so the refine/generate
ratios of the settings share one machine state and compare fairly. A setting names fields of
``refiners.SearchConfig`` (e.g. ``lookahead_tokens``) and of the request's ``RefineConfig``
(``weights``, ``candidates``) with the values to try; each setting gets its own
``Refiner(search=SearchConfig(...))`` over the same loaded model. Quality is the refiner's own:
coverage, the change of the objective's terms, and the perplexity of the text read alone by the
refiner's own model (a stand-in for how it reads that tuning may use; never the judge).

    python -m benchmarks.sweep --start 280 --stop 360 \\
        --settings '{"now": {}, "la2": {"lookahead_tokens": 2}, "fl1": {"weights": {"fluency": 1.0}}}'

``--model embedded:gemma3-270m`` (or a directory) sweeps another model; a base model (no chat template)
gets the plain-text prompt and stops at the end of its line, as in ``benchmarks.quality``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks.commongen import PLAIN_STOP, ConceptSet, load_concept_sets, prompt_ids
from benchmarks.judge import Judge
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from refiners import RefineConfig, Refiner, RefineRequest, RefineResult, SearchConfig, load_model
from refiners.generation import BatchGenerator, SamplingParams
from refiners.keywords import coverage
from refiners.models import EMBEDDED_GEMMA, EMBEDDED_MODEL, LoadedModel
from refiners.scoring import document_start_ids

TABLE = [
    Column("setting", "setting"),
    Column("prompts", "n"),
    Column("coverage_before", "coverage before", ".1%"),
    Column("coverage_after", "after", ".1%"),
    Column("coverage_gain_points", "gain (pts)", "+.1f"),
    Column("every_concept_gain_points", "every concept (pts)", "+.1f"),
    Column("fluency_change_mean", "fluency change", "+.3f"),
    Column("own_ppl_change_pct", "own ppl change %", "+.1f"),
    Column("objective_gain_mean", "objective gain", "+.3f"),
    Column("changed", "changed", "d"),
    Column("same_as_first", "same text as first setting", "d"),
    Column("refine_s_mean", "refine s", ".3f"),
    Column("time_ratio_of_sums", "refine/gen (sums)", ".3f"),
]


# The request's own settings a sweep may vary; every other key is a SearchConfig field.
REQUEST_FIELDS = ("weights", "candidates")


def split_settings(
    settings: dict[str, dict[str, Any]],
) -> tuple[dict[str, SearchConfig], dict[str, dict[str, Any]]]:
    """Per setting, its ``SearchConfig`` and its ``RefineConfig`` fields; an unknown field is named."""
    fields = set(SearchConfig.__dataclass_fields__)
    for name, setting in settings.items():
        unknown = sorted(set(setting) - fields - set(REQUEST_FIELDS))
        if unknown:
            raise SystemExit(
                f"setting {name!r}: no SearchConfig field {', '.join(unknown)}; "
                f"use {sorted(fields)} or {list(REQUEST_FIELDS)}"
            )
    searches = {
        name: SearchConfig(**{k: v for k, v in s.items() if k not in REQUEST_FIELDS})
        for name, s in settings.items()
    }
    requests = {name: {k: v for k, v in s.items() if k in REQUEST_FIELDS} for name, s in settings.items()}
    return searches, requests


def run(
    loaded: LoadedModel, items: Sequence[ConceptSet], settings: dict[str, dict[str, Any]], max_new_tokens: int
) -> list[dict]:
    """One summary row per setting."""
    searches, requests = split_settings(settings)
    refiners = {name: Refiner(loaded, search=search) for name, search in searches.items()}
    generator = BatchGenerator(loaded)
    stop = () if loaded.tokenizer.chat_template else PLAIN_STOP

    def measure(item: ConceptSet, reverse: bool) -> tuple[float, str, dict[str, tuple[float, RefineResult]]]:
        """(generate seconds, initial text, {setting: (refine seconds, result)}) of one item."""
        prompt = prompt_ids(loaded.tokenizer, item)
        started = time.perf_counter()
        [out] = generator.generate(
            [prompt], [SamplingParams(max_new_tokens=max_new_tokens, stop=stop)], keep_prompt_cache=True
        )
        generate_s = time.perf_counter() - started
        refined = {}
        for name, refiner in reversed(refiners.items()) if reverse else refiners.items():
            config = RefineConfig(keywords=item.concepts, stop=stop, **requests[name])
            started = time.perf_counter()
            [res] = refiner.refine([RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)])
            refined[name] = (time.perf_counter() - started, res)
        return generate_s, out.text, refined

    measure(items[0], False)  # untimed: the first pass pays one-off costs (caches, allocations)
    sums = {
        k: dict(refine=0.0, coverage=0.0, every=0, fluency=0.0, objective=0.0, changed=0) for k in settings
    }
    texts: dict[str, list[str]] = {k: [] for k in ["initial", *settings]}
    generate_s = coverage_before = 0.0
    every_before = 0
    for i, item in enumerate(items):
        seconds, initial_text, refined = measure(item, reverse=bool(i % 2))
        generate_s += seconds
        before = coverage(item.concepts, initial_text)
        coverage_before += before
        every_before += before == 1
        texts["initial"].append(initial_text)
        for name, (refine_s, res) in refined.items():
            s = sums[name]
            s["refine"] += refine_s
            after = coverage(item.concepts, res.refined_text)
            s["coverage"] += after
            s["every"] += after == 1
            s["fluency"] += res.objective_after.get("fluency", 0.0) - res.objective_before.get("fluency", 0.0)
            s["objective"] += res.objective_after["total"] - res.objective_before["total"]
            s["changed"] += res.refined_ids != res.initial_ids
            texts[name].append(res.refined_text)
    own_ppl = own_perplexities(loaded, texts)
    n, first = len(items), texts[next(iter(settings))]
    return [
        {
            "setting": name,
            "constants": settings[name],
            "prompts": n,
            "coverage_before": coverage_before / n,
            "coverage_after": s["coverage"] / n,
            "coverage_gain_points": 100 * (s["coverage"] - coverage_before) / n,
            "every_concept_gain_points": 100 * (s["every"] - every_before) / n,
            "fluency_change_mean": s["fluency"] / n,
            "own_ppl_change_pct": 100 * (median(own_ppl[name]) / median(own_ppl["initial"]) - 1),
            "objective_gain_mean": s["objective"] / n,
            "changed": s["changed"],
            "same_as_first": sum(a == b for a, b in zip(texts[name], first)),
            "generate_s_mean": generate_s / n,
            "refine_s_mean": s["refine"] / n,
            "time_ratio_of_sums": s["refine"] / generate_s,
        }
        for name, s in sums.items()
    ]


def own_perplexities(loaded: LoadedModel, texts: dict[str, list[str]]) -> dict[str, list[float]]:
    """Each text's perplexity read alone by the refiner's own model (after its document start), as
    the judge reads it: the same statistic for tuning, without looking at the judge."""
    reader = Judge(loaded.model, loaded.tokenizer, start_ids=document_start_ids(loaded.tokenizer))
    distinct = sorted({t for ts in texts.values() for t in ts})
    ppl = dict(zip(distinct, reader.perplexity(distinct), strict=True))
    return {name: [ppl[t] for t in ts] for name, ts in texts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=280, help="first CommonGen item (default 280: held out)")
    parser.add_argument("--stop", type=int, default=360, help="item after the last")
    parser.add_argument(
        "--settings", default='{"defaults": {}}', help="JSON {name: {SearchConfig field: value}}"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--model", default=EMBEDDED_MODEL, help=f"{EMBEDDED_MODEL}, {EMBEDDED_GEMMA} or a directory"
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "sweep.json"))
    args = parser.parse_args(argv)
    items = load_concept_sets(args.stop)[args.start : args.stop]
    if not items:
        raise SystemExit(f"no CommonGen items in [{args.start}, {args.stop})")
    rows = run(load_model(args.model, device="cpu"), items, json.loads(args.settings), args.max_new_tokens)
    print(markdown_table(rows, TABLE))
    write_json(Path(args.out), {"model": args.model, "items": [args.start, args.stop], "summary": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
