"""The latency split of Refiner in front of another engine: the upstream's generation against the local step.

``refiner serve --generator SPEC`` (the embedded model refines) and, for comparison, ``refiner serve``
generating locally are started in turn as subprocesses; each gets the same CommonGen items through
``POST /generate`` (chat-templated prompt, greedy, ``refine.keywords`` = the concepts, as
``benchmarks.http_quality`` sends them). The figures are the servers' own, read from
``details.refinement``: ``generate_seconds`` (the upstream's time, or the local generation's) and
``refine_seconds`` (the local step).

    python -m benchmarks.upstream --generator openai:http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.commongen import load_concept_sets
from benchmarks.http_quality import TABLE, run
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from benchmarks.speed import ServerProcess
from refiners.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", required=True, help="REFINER_GENERATOR of the front server")
    parser.add_argument("--start", type=int, default=360)
    parser.add_argument("--stop", type=int, default=380)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "upstream.json")
    args = parser.parse_args(argv)
    items = load_concept_sets(args.stop)[args.start : args.stop]
    tokenizer = load_model().tokenizer  # for the chat template, as a client would apply it
    results = {}
    for condition, settings in (("upstream", {"REFINER_GENERATOR": args.generator}), ("local", {})):
        server = ServerProcess(settings)
        try:
            server.wait_ready()
            results[condition] = run(server.url, items, tokenizer, args.max_new_tokens)
        finally:
            server.stop()
    rows = [{"condition": name, **result["summary"]} for name, result in results.items()]
    print(markdown_table(rows, [Column("condition", "generation"), *TABLE]))
    write_json(args.out, {"generator": args.generator, "items": [args.start, args.stop], **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
