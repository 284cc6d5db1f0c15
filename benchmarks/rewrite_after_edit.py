"""Does the text read better when the model rewrites the words after the step's last edit?

Issue 14 suggests a greedy repair of the few tokens after an edit; the one-token repair did not pay
(``benchmarks/README.md``). This measures the most the idea can give: after the step, everything after
its last changed token is generated again (greedy, the same prompt, up to the same token budget), so
the words that follow a placed keyword come from the model's own distribution. The rewrite is kept
only where it keeps the step's coverage ("rewrite if it keeps coverage"); the rewrite alone is
reported too. Quality is the refiner's own reading of the text alone (``benchmarks.sweep``'s stand-in;
never the judge), on CommonGen items the quality benchmark's held-out slice does not use. The rewrite
is a second generation, outside the step's one scoring pass: its time is reported beside generation's.

    python -m benchmarks.rewrite_after_edit --start 743 --stop 793
    python -m benchmarks.rewrite_after_edit --start 743 --stop 793 --model embedded:gemma3-270m
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from statistics import median

from benchmarks.commongen import PLAIN_STOP, ConceptSet, load_concept_sets, prompt_ids
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from benchmarks.sweep import own_perplexities
from refiners import RefineConfig, Refiner, RefineRequest, load_model
from refiners.generation import BatchGenerator, SamplingParams, end_at_stop
from refiners.keywords import coverage
from refiners.models import EMBEDDED_GEMMA, EMBEDDED_MODEL, LoadedModel

CONDITIONS = ("greedy", "greedy + step", "rewrite after the last edit", "rewrite if it keeps coverage")

TABLE = [
    Column("condition", "condition"),
    Column("prompts", "n"),
    Column("coverage", "coverage", ".1%"),
    Column("every_concept", "every concept", ".1%"),
    Column("own_ppl_median", "own ppl (median)", ".2f"),
    Column("own_ppl_change_pct", "vs greedy %", "+.1f"),
    Column("changed", "texts changed", "d"),
    Column("not_the_steps", "not the step's text", "d"),
    Column("seconds_per_generation", "time / generation", ".2f"),
]


def changed_prefix(initial: Sequence[int], refined: Sequence[int]) -> list[int]:
    """``refined`` up to its last token that differs from ``initial`` (aligned from the end)."""
    same = 0
    while same < min(len(initial), len(refined)) and refined[-1 - same] == initial[-1 - same]:
        same += 1
    return list(refined[: len(refined) - same])


def rewritten(
    generator: BatchGenerator,
    prompt: list[int],
    initial: Sequence[int],
    refined: Sequence[int],
    max_new_tokens: int,
    stop: Sequence[str],
) -> str | None:
    """``refined`` up to its last edit, then greedy up to ``max_new_tokens`` tokens in all; None where
    the step changed nothing or left no words after its last edit."""
    prefix = changed_prefix(initial, refined)
    if list(refined) == list(initial) or prefix == list(refined) or len(prefix) >= max_new_tokens:
        return None
    params = SamplingParams(max_new_tokens=max_new_tokens - len(prefix), stop=tuple(stop))
    [tail] = generator.generate([prompt + prefix], [params])
    decoded = generator.tokenizer.decode(prefix + list(tail.token_ids), skip_special_tokens=True)
    return end_at_stop(decoded, stop) or decoded


def run(loaded: LoadedModel, items: Sequence[ConceptSet], max_new_tokens: int) -> list[dict]:
    """One row per condition of ``CONDITIONS``."""
    generator, refiner = BatchGenerator(loaded), Refiner(loaded)
    stop = () if loaded.tokenizer.chat_template else PLAIN_STOP
    texts: dict[str, list[str]] = {c: [] for c in CONDITIONS}
    seconds = dict.fromkeys(CONDITIONS, 0.0)
    for item in items:
        prompt = prompt_ids(loaded.tokenizer, item)
        started = time.perf_counter()
        [out] = generator.generate(
            [prompt], [SamplingParams(max_new_tokens=max_new_tokens, stop=stop)], keep_prompt_cache=True
        )
        seconds["greedy"] += time.perf_counter() - started
        config = RefineConfig(keywords=item.concepts, stop=stop)
        started = time.perf_counter()
        [res] = refiner.refine([RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)])
        seconds["greedy + step"] += time.perf_counter() - started
        started = time.perf_counter()
        rewrite = rewritten(generator, prompt, out.token_ids, res.refined_ids, max_new_tokens, stop)
        seconds["rewrite after the last edit"] += time.perf_counter() - started
        rewrite = res.refined_text if rewrite is None else rewrite
        keeps = coverage(item.concepts, rewrite) >= coverage(item.concepts, res.refined_text)
        for condition, text in zip(
            CONDITIONS, (out.text, res.refined_text, rewrite, rewrite if keeps else res.refined_text)
        ):
            texts[condition].append(text)
    seconds["rewrite after the last edit"] += seconds["greedy + step"]
    seconds["rewrite if it keeps coverage"] = seconds["rewrite after the last edit"]
    return summarise(items, texts, own_perplexities(loaded, texts), seconds)


def summarise(
    items: Sequence[ConceptSet],
    texts: dict[str, list[str]],
    ppl: dict[str, list[float]],
    seconds: dict[str, float],
) -> list[dict]:
    base = median(ppl["greedy"])
    rows = []
    for condition, ts in texts.items():
        cov = [coverage(item.concepts, t) for item, t in zip(items, ts, strict=True)]
        rows.append(
            {
                "condition": condition,
                "prompts": len(ts),
                "coverage": sum(cov) / len(ts),
                "every_concept": sum(c == 1 for c in cov) / len(ts),
                "own_ppl_median": median(ppl[condition]),
                "own_ppl_change_pct": 100 * (median(ppl[condition]) / base - 1),
                "changed": sum(a != b for a, b in zip(ts, texts["greedy"])),
                "not_the_steps": sum(a != b for a, b in zip(ts, texts["greedy + step"])),
                # generation's own time is 1.0; the step's, and the rewrite's on top of it
                "seconds_per_generation": seconds[condition] / seconds["greedy"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=743, help="first CommonGen item (default 743)")
    parser.add_argument(
        "--stop", type=int, default=793, help="item after the last (the held-out slice starts at 793)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--model", default=EMBEDDED_MODEL, help=f"{EMBEDDED_MODEL}, {EMBEDDED_GEMMA} or a directory"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "rewrite-after-edit.json")
    args = parser.parse_args(argv)
    items = load_concept_sets(args.stop)[args.start : args.stop]
    if not items:
        raise SystemExit(f"no CommonGen items in [{args.start}, {args.stop})")
    rows = run(load_model(args.model, device="cpu"), items, args.max_new_tokens)
    print(markdown_table(rows, TABLE))
    write_json(args.out, {"model": args.model, "items": [args.start, args.stop], "summary": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
