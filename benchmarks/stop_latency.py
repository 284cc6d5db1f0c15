"""How soon the engine's worker is free after a caller leaves, at each phase of a large request.

A large request (a long prompt, many new tokens, default refinement with many keywords) is submitted to
a real ``Engine`` on the embedded model; its caller leaves (the awaiting task is cancelled, as a client
disconnect does) after ``--delays`` seconds, which land in generation or in refinement. The table gives
the phase it was in and how long the worker then took to become idle: the work between two
checkpoints (a decode step, a pass or a chunk of one).

    python -m benchmarks.stop_latency --delays 5 20 32 45
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json

COLUMNS = [
    Column("delay_s", "left after s"),
    Column("phase", "phase then"),
    Column("free_after_s", "worker free after s", ".2f"),
]


async def measure(engine: Any, job: Any, delay_s: float, phase: dict[str, str]) -> dict[str, Any]:
    phase["now"] = "queued"
    task = asyncio.ensure_future(engine.submit(job))
    await asyncio.sleep(delay_s)
    at = "finished" if task.done() else phase["now"]
    left = time.monotonic()
    task.cancel()
    while engine._running or engine.queue_size:
        await asyncio.sleep(0.01)
    return {"delay_s": delay_s, "phase": at, "free_after_s": time.monotonic() - left}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delays", type=float, nargs="+", default=[5.0, 20.0, 32.0, 45.0])
    parser.add_argument("--prompt-words", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--keywords", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "stop-latency.json")
    args = parser.parse_args(argv)

    from app.engine import Engine, EngineLimits, Job
    from refiners import RefineConfig, Refiner, load_model
    from refiners.generation import SamplingParams

    loaded = load_model()
    refiner = Refiner(loaded)
    engine = Engine(loaded, refiner, EngineLimits(request_timeout_s=3600))
    engine.warm_up()
    phase = {"now": "idle"}
    generate, refine = engine.generator.generate, refiner.refine

    def generating(*a: Any, **k: Any) -> Any:
        phase["now"] = "generation"
        return generate(*a, **k)

    def refining(*a: Any, **k: Any) -> Any:
        phase["now"] = "refinement"
        return refine(*a, **k)

    engine.generator.generate, refiner.refine = generating, refining  # type: ignore[method-assign]
    engine.start()
    prompt = loaded.tokenizer.encode("hello " * args.prompt_words)
    config = RefineConfig(keywords=tuple(f"word{i} here" for i in range(args.keywords)))
    job = Job(prompt, SamplingParams(max_new_tokens=args.new_tokens), config)
    rows = []
    for delay in args.delays:
        rows.append(asyncio.run(measure(engine, job, delay, phase)))
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    engine.stop()
    print(markdown_table(rows, COLUMNS))
    write_json(args.out, {"prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
