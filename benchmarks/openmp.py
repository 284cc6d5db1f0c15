"""Why the server runs every torch call on one thread: the same refinements, timed before and after a
second thread has run one parallel torch op.

libgomp (PyTorch's OpenMP on Linux) gives each thread that runs a parallel op its own team of worker
threads; once it manages more threads than there are CPUs it stops spinning between parallel regions.
Here one thread (``app.torch_thread.TorchThread``, as in the server) loads the embedded model and times
``--runs`` generations + refinements, then the main thread runs a single 512x512 matmul, and the same
thread times the same work again. The effect lasts for the life of the process, so run it fresh.

    python -m benchmarks.openmp
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.torch_thread import TorchThread
from benchmarks.commongen import load_concept_sets, prompt_ids
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from refiners import RefineConfig, Refiner, RefineRequest, load_model
from refiners.generation import BatchGenerator, SamplingParams

TABLE = [
    Column("when", "when"),
    Column("runs", "runs"),
    Column("median_s", "median s", ".3f"),
    Column("min_s", "min s", ".3f"),
    Column("ratio", "vs one thread", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openmp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="timed runs before and after")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "openmp.json")
    args = parser.parse_args(argv)
    items = load_concept_sets(3)[1:3]
    state: dict[str, Any] = {}

    def setup() -> None:
        loaded = load_model()
        state.update(loaded=loaded, generator=BatchGenerator(loaded), refiner=Refiner(loaded))

    def work() -> float:
        """Seconds of one generation + refinement of each item."""
        loaded, generator, refiner = state["loaded"], state["generator"], state["refiner"]
        started = time.perf_counter()
        for item in items:
            prompt = prompt_ids(loaded.tokenizer, item)
            params = SamplingParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
            [out] = generator.generate([prompt], [params], keep_prompt_cache=True)
            config = RefineConfig(keywords=item.concepts)
            refiner.refine([RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)])
        return time.perf_counter() - started

    # One thread does all the torch work, as in the server.
    torch_thread = TorchThread("benchmark-torch")
    torch_thread.submit(setup).result()
    alone = torch_thread.submit(lambda: [work() for _ in range(args.runs + 1)][1:]).result()
    x = torch.randn(512, 512)
    (x @ x).sum()  # the main thread's first parallel op: a second OpenMP team now exists
    joined = torch_thread.submit(lambda: [work() for _ in range(args.runs)]).result()
    torch_thread.close()
    rows = []
    for when, times in (("torch on one thread only", alone), ("after one matmul on the main thread", joined)):
        rows.append(
            {"when": when, "runs": len(times), "median_s": statistics.median(times), "min_s": min(times)}
        )
    for row in rows:
        row["ratio"] = row["median_s"] / rows[0]["median_s"]
    print(markdown_table(rows, TABLE))
    write_json(args.out, {"settings": {"runs": args.runs, "tokens": args.tokens}, "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
