"""How the engine forms batches under clients that each send their next request when answered.

A tiny random-weight Llama (2 layers, the embedded tokenizer) is served by ``refiner serve`` on the CPU:
its forward costs almost nothing, as a small model's does on a GPU, so the server's own costs and the
way batches form decide the throughput. For each batch window, a server with batching off
(``REFINER_MAX_BATCH_SIZE=1``) and one with ``--batch-size`` take the same requests from ``--clients``
clients (16 new tokens, distinct CommonGen prompts, with and without refinement); the mean batch size
comes from the server's ``refiner_batch_size`` histogram.

    python -m benchmarks.batching --windows 10 20
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.commongen import load_concept_sets, prompt_text
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from benchmarks.speed import ServerProcess, generate_bodies, load_level, load_tokenizer

TABLE = [
    Column("window_ms", "window ms"),
    Column("max_batch_size", "max batch"),
    Column("refine", "refine"),
    Column("clients", "clients"),
    Column("requests", "requests"),
    Column("requests_per_s", "req/s", ".2f"),
    Column("vs_batching_off", "vs batching off", ".2f"),
    Column("latency_p50_s", "p50 s", ".2f"),
    Column("batches", "batches"),
    Column("mean_batch_size", "mean batch", ".1f"),
]


def save_tiny_model(directory: str, tokenizer_dir: str | None) -> None:
    tokenizer = load_tokenizer("embedded", tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def batch_histogram(url: str) -> tuple[float, float]:
    """(count, sum) of the server's ``refiner_batch_size`` histogram."""
    text = httpx.get(f"{url}/metrics").text
    values = [re.search(rf"^refiner_batch_size_{k} (\S+)", text, re.M) for k in ("count", "sum")]
    return tuple(float(v.group(1)) if v else 0.0 for v in values)  # type: ignore[return-value]


def measure(
    model_dir: str, window_ms: float, batch_size: int, bodies: dict[bool, list[dict]], clients: int
) -> list[dict[str, Any]]:
    server = ServerProcess(
        {"REFINER_MAX_BATCH_SIZE": str(batch_size), "REFINER_BATCH_WINDOW_MS": str(window_ms)},
        model=model_dir,
        device="cpu",
    )
    rows = []
    try:
        server.wait_ready()
        for refine, sent in bodies.items():
            asyncio.run(load_level(server.url, sent[:2], 1))  # warm-up
            count, total = batch_histogram(server.url)
            row = asyncio.run(load_level(server.url, sent, clients))
            count_after, total_after = batch_histogram(server.url)
            batches = count_after - count
            rows.append(
                {
                    "window_ms": window_ms,
                    "max_batch_size": batch_size,
                    "refine": refine,
                    "clients": clients,
                    **{k: row[k] for k in ("requests", "requests_per_s", "latency_p50_s", "errors")},
                    "batches": int(batches),
                    "mean_batch_size": (total_after - total) / batches if batches else float("nan"),
                }
            )
    finally:
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=description)
    parser.add_argument("--windows", nargs="+", type=float, default=[10.0, 20.0], help="batch windows, ms")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "batching.json")
    args = parser.parse_args(argv)
    items = load_concept_sets(args.requests)
    tokenizer = load_tokenizer("embedded", args.tokenizer)
    texts = [prompt_text(tokenizer, it) for it in items]
    bodies = {r: generate_bodies(texts, [it.concepts for it in items], r, 16) for r in (False, True)}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="refiner-tiny-") as model_dir:
        save_tiny_model(model_dir, args.tokenizer)
        for window in args.windows:
            off = measure(model_dir, window, 1, bodies, args.clients)
            on = measure(model_dir, window, args.batch_size, bodies, args.clients)
            for row in off + on:
                base = next(o for o in off if o["refine"] == row["refine"])
                row["vs_batching_off"] = row["requests_per_s"] / base["requests_per_s"]
            rows += off + on
    print(markdown_table(rows, TABLE))
    write_json(args.out, {"settings": vars(args) | {"out": str(args.out)}, "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
