"""Estimated against measured peak memory of one refinement (``refiners.cost``), on the embedded model.

Each scenario runs in a fresh process: load the model, warm up, then refine one output (given, not
generated, so its length is exact) while a thread samples the resident memory every few
milliseconds. The table compares the peak above the warmed-up baseline with ``CostModel.estimate``;
the estimate should be the larger (ratio >= 1) so that admission bounds the real peak.

    python -m benchmarks.memory                       # every scenario
    python -m benchmarks.memory --scenarios long coverage --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json

MB = 2**20
SENTENCE = "The dog ran across the park. "
# name: (prompt sentences, output sentences, refine config fields)
SCENARIOS: dict[str, tuple[int, int, dict[str, Any]]] = {
    "default": (4, 4, {"keywords": ["frisbee", "catch", "grass"]}),
    "long": (130, 70, {"keywords": ["frisbee"]}),
    "many-candidates": (130, 70, {"candidates": 48, "keywords": [f"word{i}" for i in range(16)]}),
    "coverage": (60, 40, {"weights": {"prompt_coverage": 1.0}}),
    "hybrid-2-steps": (60, 40, {"method": "hybrid", "steps": 2, "candidates": 32}),
}


def run_scenario(name: str, pass_mb: int) -> dict[str, Any]:
    """Measure one scenario in this process (``--child``)."""
    from app.admission import resident_bytes
    from refiners import RefineConfig, Refiner, load_model
    from refiners.refiner import RefineRequest

    prompt_n, output_n, fields = SCENARIOS[name]
    loaded = load_model()
    refiner = Refiner(loaded, scoring_pass_bytes=pass_mb * MB)
    encode = loaded.tokenizer.encode
    warm = RefineRequest(encode("Say hello."), encode(" Hello there."), RefineConfig(keywords=("hi",)))
    refiner.refine([warm])
    prompt = encode("Write about a dog. " + SENTENCE * prompt_n)
    output = encode(SENTENCE * output_n, add_special_tokens=False)
    config = RefineConfig(**{k: tuple(v) if k == "keywords" else v for k, v in fields.items()})
    keyword_tokens = 2 + max(
        (len(encode(" " + k, add_special_tokens=False)) for k in config.keywords), default=0
    )
    estimate = refiner.cost.estimate(
        len(prompt), len(output), config, generate=False, keyword_tokens=keyword_tokens
    )

    baseline = resident_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    refiner.refine([RefineRequest(prompt, output, config)])
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {
        "scenario": name,
        "prompt_tokens": len(prompt),
        "output_tokens": len(output),
        "estimated_mb": estimate.memory_bytes / MB,
        "measured_mb": (peak - baseline) / MB,
        "ratio": estimate.memory_bytes / max(1, peak - baseline),
        "estimated_token_rows": estimate.refine_token_rows,
        "seconds": seconds,
        "ms_per_token_row": 1e3 * seconds / max(1, estimate.refine_token_rows),
    }


COLUMNS = [
    Column("scenario", "scenario"),
    Column("prompt_tokens", "prompt"),
    Column("output_tokens", "output"),
    Column("estimated_mb", "estimated MB", ".0f"),
    Column("measured_mb", "measured MB", ".0f"),
    Column("ratio", "est/meas", ".2f"),
    Column("seconds", "refine s", ".1f"),
    Column("ms_per_token_row", "ms/row (est. rows)", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--pass-mb", type=int, default=256, help="scoring pass budget (the server's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_scenario(args.child, args.pass_mb)))
        return 0
    rows = []
    for name in args.scenarios:
        command = [sys.executable, "-m", "benchmarks.memory", "--child", name, "--pass-mb", str(args.pass_mb)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    print(markdown_table(rows, COLUMNS))
    write_json(args.out, {"pass_mb": args.pass_mb, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
