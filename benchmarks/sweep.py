"""Side-by-side sweep of the refiner's tuning constants on held-out CommonGen items.

Each item is generated once (greedy, the server's way: the prompt cache is kept), then refined under
every setting in the same process, so the refine/generate ratios of the settings share one machine
state and compare fairly. A setting names fields of ``refiners.SearchConfig`` (e.g. ``lookahead_tokens``)
and the values to try; each setting gets its own ``Refiner(search=SearchConfig(**setting))`` over the
same loaded model. Quality is the refiner's own: coverage and the change of the objective's terms,
never the judge.

    python -m benchmarks.sweep --start 280 --stop 360 \\
        --settings '{"now": {}, "la2": {"lookahead_tokens": 2}}'
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.commongen import ConceptSet, load_concept_sets, prompt_ids
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from refiners import RefineConfig, Refiner, RefineRequest, RefineResult, SearchConfig, load_model
from refiners.generation import BatchGenerator, SamplingParams
from refiners.keywords import coverage
from refiners.models import LoadedModel

TABLE = [
    Column("setting", "setting"),
    Column("prompts", "n"),
    Column("coverage_before", "coverage before", ".1%"),
    Column("coverage_after", "after", ".1%"),
    Column("coverage_gain_points", "gain (pts)", "+.1f"),
    Column("fluency_change_mean", "fluency change", "+.3f"),
    Column("objective_gain_mean", "objective gain", "+.3f"),
    Column("changed", "changed", "d"),
    Column("time_ratio_of_sums", "refine/gen (sums)", ".3f"),
]


def search_configs(settings: dict[str, dict[str, Any]]) -> dict[str, SearchConfig]:
    """One ``SearchConfig`` per setting; an unknown field is named in the error."""
    fields = set(SearchConfig.__dataclass_fields__)
    for name, setting in settings.items():
        unknown = sorted(set(setting) - fields)
        if unknown:
            raise SystemExit(
                f"setting {name!r}: no SearchConfig field {', '.join(unknown)}; use {sorted(fields)}"
            )
    return {name: SearchConfig(**setting) for name, setting in settings.items()}


def run(
    loaded: LoadedModel, items: Sequence[ConceptSet], settings: dict[str, dict[str, Any]], max_new_tokens: int
) -> list[dict]:
    """One summary row per setting."""
    refiners = {name: Refiner(loaded, search=search) for name, search in search_configs(settings).items()}
    generator = BatchGenerator(loaded)

    def measure(item: ConceptSet) -> tuple[float, str, dict[str, tuple[float, RefineResult]]]:
        """(generate seconds, initial text, {setting: (refine seconds, result)}) of one item."""
        prompt = prompt_ids(loaded.tokenizer, item)
        started = time.perf_counter()
        [out] = generator.generate(
            [prompt], [SamplingParams(max_new_tokens=max_new_tokens)], keep_prompt_cache=True
        )
        generate_s = time.perf_counter() - started
        refined = {}
        for name, refiner in refiners.items():
            config = RefineConfig(keywords=item.concepts)
            started = time.perf_counter()
            [res] = refiner.refine([RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)])
            refined[name] = (time.perf_counter() - started, res)
        return generate_s, out.text, refined

    measure(items[0])  # untimed: the first pass pays one-off costs (caches, allocations)
    sums = {k: dict(refine=0.0, coverage=0.0, fluency=0.0, objective=0.0, changed=0) for k in settings}
    generate_s = coverage_before = 0.0
    for item in items:
        seconds, initial_text, refined = measure(item)
        generate_s += seconds
        coverage_before += coverage(item.concepts, initial_text)
        for name, (refine_s, res) in refined.items():
            s = sums[name]
            s["refine"] += refine_s
            s["coverage"] += coverage(item.concepts, res.refined_text)
            s["fluency"] += res.objective_after.get("fluency", 0.0) - res.objective_before.get("fluency", 0.0)
            s["objective"] += res.objective_after["total"] - res.objective_before["total"]
            s["changed"] += res.refined_ids != res.initial_ids
    n = len(items)
    return [
        {
            "setting": name,
            "constants": settings[name],
            "prompts": n,
            "coverage_before": coverage_before / n,
            "coverage_after": s["coverage"] / n,
            "coverage_gain_points": 100 * (s["coverage"] - coverage_before) / n,
            "fluency_change_mean": s["fluency"] / n,
            "objective_gain_mean": s["objective"] / n,
            "changed": s["changed"],
            "generate_s_mean": generate_s / n,
            "refine_s_mean": s["refine"] / n,
            "time_ratio_of_sums": s["refine"] / generate_s,
        }
        for name, s in sums.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=280, help="first CommonGen item (default 280: held out)")
    parser.add_argument("--stop", type=int, default=360, help="item after the last")
    parser.add_argument(
        "--settings", default='{"defaults": {}}', help="JSON {name: {SearchConfig field: value}}"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS_DIR / "sweep.json"))
    args = parser.parse_args(argv)
    items = load_concept_sets(args.stop)[args.start : args.stop]
    if not items:
        raise SystemExit(f"no CommonGen items in [{args.start}, {args.stop})")
    rows = run(load_model(), items, json.loads(args.settings), args.max_new_tokens)
    print(markdown_table(rows, TABLE))
    write_json(Path(args.out), {"items": [args.start, args.stop], "summary": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
