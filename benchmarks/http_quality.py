"""What a client sees: coverage, objective and time of refinement through the real HTTP server.

``refiner serve`` (the embedded model, default settings) is started as a subprocess on a loopback
port; one client sends ``POST /generate`` for each CommonGen item, the chat-templated prompt as
``inputs`` (as the README's example does), greedy, with ``refine.keywords`` = the concepts. Everything
is read from the answers: the initial and refined texts, the objective before and after, and the
server's own generate and refine seconds (``details.refinement``). Default items 360-399: used
neither by the quality benchmark (0-199) nor by the tuning sweeps (200-359).

    python -m benchmarks.http_quality --start 360 --stop 400
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx

from benchmarks.commongen import ConceptSet, concept_coverage, load_concept_sets
from benchmarks.report import RESULTS_DIR, Column, markdown_table, mean, write_json
from benchmarks.speed import ServerProcess
from refiners.models import load_model

TABLE = [
    Column("prompts", "n"),
    Column("tokens_mean", "tokens"),
    Column("coverage_initial", "coverage initial", ".1%"),
    Column("coverage_refined", "refined", ".1%"),
    Column("coverage_gain_points", "gain (pts)", "+.1f"),
    Column("objective_decreased_frac", "obj. down", ".0%"),
    Column("changed_frac", "changed", ".0%"),
    Column("generate_s_mean", "generate s", ".3f"),
    Column("refine_s_mean", "refine s", ".3f"),
    Column("time_ratio_of_sums", "refine/gen (sums)", ".3f"),
]


def run(url: str, items: list[ConceptSet], tokenizer: Any, max_new_tokens: int) -> dict[str, Any]:
    records = []
    with httpx.Client(base_url=url, timeout=600) as http:
        for item in items:
            messages = [{"role": "user", "content": item.instruction}]
            inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            body = {
                "inputs": inputs,
                "parameters": {"max_new_tokens": max_new_tokens, "refine": {"keywords": list(item.concepts)}},
            }
            response = http.post("/generate", json=body)
            response.raise_for_status()
            answer = response.json()
            details = answer["details"]
            r = details["refinement"]
            records.append(
                {
                    "index": item.index,
                    "tokens": details["generated_tokens"],
                    "initial": r["initial_text"],
                    "refined": answer["generated_text"],
                    "coverage_initial": concept_coverage(item.concepts, r["initial_text"]),
                    "coverage_refined": concept_coverage(item.concepts, answer["generated_text"]),
                    "objective_before": r["objective_before"]["total"],
                    "objective_after": r["objective_after"]["total"],
                    "generate_s": r["generate_seconds"],
                    "refine_s": r["refine_seconds"],
                }
            )
    generate_s, refine_s = (sum(r[k] for r in records) for k in ("generate_s", "refine_s"))
    summary = {
        "prompts": len(records),
        "tokens_mean": mean([r["tokens"] for r in records]),
        "coverage_initial": mean([r["coverage_initial"] for r in records]),
        "coverage_refined": mean([r["coverage_refined"] for r in records]),
        "objective_decreased_frac": mean(
            [float(r["objective_after"] < r["objective_before"]) for r in records]
        ),
        "changed_frac": mean([float(r["refined"] != r["initial"]) for r in records]),
        "generate_s_mean": generate_s / len(records),
        "refine_s_mean": refine_s / len(records),
        "time_ratio_of_sums": refine_s / generate_s,
    }
    summary["coverage_gain_points"] = 100 * (summary["coverage_refined"] - summary["coverage_initial"])
    return {"summary": summary, "records": records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=360)
    parser.add_argument("--stop", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "http-quality.json")
    args = parser.parse_args(argv)
    items = load_concept_sets(args.stop)[args.start : args.stop]
    server = ServerProcess({})
    try:
        server.wait_ready()
        tokenizer = load_model().tokenizer  # for the chat template, as a client would apply it
        result = run(server.url, items, tokenizer, args.max_new_tokens)
    finally:
        server.stop()
    print(markdown_table([result["summary"]], TABLE))
    write_json(args.out, {"items": [args.start, args.stop], **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
