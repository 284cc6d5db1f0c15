"""The C library's allocator against tcmalloc: the step and generation on natural answers, side by side.

glibc serves an allocation over 32 MB with fresh pages from the kernel and returns them when it is
freed, so every pass of a step page-faults its gathered caches and (rows, V) logits again; tcmalloc
keeps and reuses them (``refiner serve`` preloads it where present, ``app/cli.py``). A preload only
takes effect when a program starts, so each measurement is a fresh process: for each round and
model, one process per allocator, the order alternating between rounds. Each process generates
greedy answers that stop at their own end (the quality benchmark's prompts, 32 new tokens at most),
refines each once at the default settings, and reports the mean times, the minor page faults per step
and its peak RSS.

    python -m benchmarks.allocator --rounds 3 --sets 24 \\
        --models embedded:smollm2-135m-instruct embedded:gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.cli import tcmalloc_environment
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json

ALLOCATORS = ("glibc", "tcmalloc")
FIRST_SET = 300  # tuning sets 300+: speed only, no quality figure is read from them
TABLE = [
    Column("model", "model"),
    Column("allocator", "allocator"),
    Column("generate_s", "generate s", ".3f"),
    Column("step_s", "step s", ".3f"),
    Column("ratio", "step / generation", ".3f"),
    Column("faults", "minor faults / step", ".0f"),
    Column("rss_mb", "peak RSS MiB", ".0f"),
    Column("step_vs_glibc", "step vs glibc, per round", ""),
]


def measure(model: str, sets: int) -> dict[str, float]:
    """In this process: generate then refine ``sets`` natural answers; mean times and faults."""
    from benchmarks.commongen import PLAIN_STOP, load_concept_sets, prompt_ids
    from benchmarks.speed import freeze_start_up_objects
    from refiners import RefineConfig, Refiner, RefineRequest
    from refiners.generation import BatchGenerator, SamplingParams
    from refiners.models import load_model

    loaded = load_model(model, device="cpu")
    stop = () if loaded.tokenizer.chat_template else PLAIN_STOP
    generator, refiner = BatchGenerator(loaded), Refiner(loaded)
    freeze_start_up_objects()
    requests, generate_s = [], 0.0
    for item in load_concept_sets(FIRST_SET + sets)[FIRST_SET:]:
        prompt = prompt_ids(loaded.tokenizer, item)
        started = time.perf_counter()
        [out] = generator.generate(
            [prompt], [SamplingParams(max_new_tokens=32, stop=stop)], keep_prompt_cache=True
        )
        generate_s += time.perf_counter() - started
        config = RefineConfig(keywords=item.concepts, stop=stop)
        requests.append(RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache))
    refiner.refine(requests[:1])  # warm-up, not counted
    faults, step_s = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0.0
    for request in requests:
        started = time.perf_counter()
        refiner.refine([request])
        step_s += time.perf_counter() - started
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "generate_s": generate_s / sets,
        "step_s": step_s / sets,
        "faults": faults / sets,
        "rss_mb": rss_mb,
    }


def run_child(model: str, sets: int, allocator: str) -> dict[str, float]:
    """``measure`` in a fresh process whose preload is ``allocator``'s."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator == "tcmalloc":
        env = tcmalloc_environment(env) or env  # the server's own rule (app/cli.py)
    command = [
        sys.executable,
        "-m",
        "benchmarks.allocator",
        "--child",
        "--models",
        model,
        "--sets",
        str(sets),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.allocator", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--models", nargs="+", default=["embedded:smollm2-135m-instruct", "embedded:gemma3-270m"]
    )
    parser.add_argument("--sets", type=int, default=24, help="concept sets per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per model and allocator")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS_DIR / "allocator.json"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.models[0], args.sets)))
        return 0
    if tcmalloc_environment({}) is None:
        print("tcmalloc is not installed (Debian: libtcmalloc-minimal4; `make tcmalloc`)", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for model in args.models:
            for allocator in ALLOCATORS if r % 2 == 0 else ALLOCATORS[::-1]:
                runs.append(
                    {
                        "round": r,
                        "model": model,
                        "allocator": allocator,
                        **run_child(model, args.sets, allocator),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    rows = []
    for model in args.models:
        mine = {a: [x for x in runs if x["model"] == model and x["allocator"] == a] for a in ALLOCATORS}
        for allocator, xs in mine.items():
            median = {
                k: statistics.median(x[k] for x in xs) for k in ("generate_s", "step_s", "faults", "rss_mb")
            }
            paired = [x["step_s"] / g["step_s"] for x, g in zip(xs, mine["glibc"], strict=True)]
            rows.append(
                {
                    "model": model,
                    "allocator": allocator,
                    **median,
                    "ratio": median["step_s"] / median["generate_s"],
                    "step_vs_glibc": ", ".join(f"{p:.2f}" for p in paired),
                    "step_vs_glibc_each": paired,
                }
            )
    print(f"\nMedians over {args.rounds} processes each, {args.sets} natural answers a process\n")
    print(markdown_table(rows, TABLE))
    out = write_json(
        Path(args.out),
        {"sets": [FIRST_SET, FIRST_SET + args.sets], "rounds": args.rounds, "rows": rows, "runs": runs},
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
