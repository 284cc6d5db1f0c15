"""How the refinement step's cost grows with the requests it refines together, in process.

A server's batch of refined requests is refined in one ``Refiner.refine`` call. Its passes run every
request together, but the methods' proposals and the lookahead's estimates are per request, on the
host: on a GPU, where a pass over a few hundred token rows costs little, those decide what a batch
costs. For each batch size, the same greedy outputs (``--length`` tokens, CommonGen prompts and
concepts as keywords, default settings) are refined ``--repeats`` times after one untimed run of that
shape; the table gives the fastest run and its cost per request. The refiner runs the prompts itself
(the server passes generation's prompt caches instead): the prompt column is that pass.

    python -m benchmarks.step_batch --arch embedded --batches 1 4 16
    python -m benchmarks.step_batch --arch llama-1b --device cuda --tokenizer .gpu/tokenizer
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.commongen import load_concept_sets, prompt_text
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from benchmarks.speed import ARCHS, STEP_PARTS, exact_length, load_arch
from refiners.config import RefineConfig
from refiners.generation import BatchGenerator
from refiners.refiner import Refiner, RefineRequest

TABLE = [
    Column("requests", "requests"),
    Column("refine_s", "refine s", ".3f"),
    Column("per_request_ms", "ms a request", ".1f"),
    *(Column(part, part, ".3f") for part in STEP_PARTS),
    Column("candidates", "candidates"),
]


def measure(refiner: Refiner, requests: list[RefineRequest], repeats: int, device: str) -> dict[str, Any]:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    refiner.refine(requests)  # the first run of a shape: allocations, kernel choices
    sync()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        results = refiner.refine(requests)
        sync()
        runs.append((time.perf_counter() - started, results))
    seconds, results = min(runs, key=lambda r: r[0])
    n = len(requests)
    return {
        "requests": n,
        "refine_s": seconds,
        "per_request_ms": 1000 * seconds / n,
        "runs_s": [s for s, _ in runs],
        # Each result carries its share of the batch's time in each part: times n is the batch's.
        **{part: getattr(results[0], f"{part}_seconds") * n for part in STEP_PARTS},
        "candidates": sum(r.candidates_scored for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_batch", description=description)
    parser.add_argument("--arch", choices=ARCHS, default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for llama-1b/8b")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--length", type=int, default=16, help="output tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: results/step-batch-ARCH-DEVICE.json")
    args = parser.parse_args(argv)
    loaded = load_arch(args.arch, args.device, args.tokenizer)
    tokenizer = loaded.tokenizer
    items = load_concept_sets(max(args.batches))
    prompts = [tokenizer.encode(prompt_text(tokenizer, it), add_special_tokens=False) for it in items]
    outputs = BatchGenerator(loaded).generate(prompts, [exact_length(args.length)] * len(prompts))
    requests = [
        RefineRequest(p, list(o.token_ids), RefineConfig(keywords=tuple(it.concepts)))
        for p, o, it in zip(prompts, outputs, items, strict=True)
    ]
    refiner = Refiner(loaded)
    rows = [measure(refiner, requests[:n], args.repeats, args.device) for n in args.batches]
    print(markdown_table(rows, TABLE))
    out = args.out or RESULTS_DIR / f"step-batch-{args.arch}-{args.device.split(':')[0]}.json"
    settings = vars(args) | {"out": str(out)}
    write_json(out, {"arch": args.arch, "device": args.device, "settings": settings, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
