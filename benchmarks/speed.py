"""Speed benchmark: what refinement costs next to generation, and how the server keeps up under load.

Part ``latency`` (in-process, one request at a time): for outputs of 16, 32, 64 and 128 tokens, the
generation time, the refinement time of each method and their ratio. The output length is forced by
suppressing EOS and the other special tokens while decoding greedily (a logits processor added to the
request's ``SamplingParams``), so every output has exactly the asked length. Architectures:

- ``embedded``: the embedded SmolLM2-135M (CPU by default);
- ``llama-1b`` / ``llama-8b``: random-weight models with the real Llama-3.2-1B / Llama-3.1-8B configs
  (written below; nothing is downloaded), bf16 on CUDA, with the embedded tokenizer (its ids are a subset
  of the 128k vocabulary, which keeps the real embedding / LM-head cost).

On CUDA every timing is fenced by ``torch.cuda.synchronize()`` and preceded by warm-up iterations; peak
memory is ``torch.cuda.max_memory_allocated``. On CPU peak memory is the process's peak RSS.

Part ``throughput`` (through the real HTTP server): ``refiner serve`` is started as a subprocess on a
free loopback port, once with ``REFINER_MAX_BATCH_SIZE=1`` (batching off) and once with 8 (on); then 1,
4, 16 and 64 concurrent clients send ``POST /generate`` requests (distinct CommonGen prompts,
``max_new_tokens`` 16), with and without refinement. Reported: requests/s, p50/p95 latency, errors and
the server's peak RSS.

Part ``packing`` (CPU): the same prompts generated and refined in turn by a model whose linear weights
are packed once for oneDNN (``refiners.packed``, the default) and by one with plain ``nn.Linear``.

    python -m benchmarks.speed --part latency --lengths 16          # quick check
    python -m benchmarks.speed                                      # everything, CPU (make bench-speed)
    python -m benchmarks.speed --part latency --arch llama-1b --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig

from benchmarks.commongen import ConceptSet, load_concept_sets, prompt_ids, prompt_text
from benchmarks.report import (
    RESULTS_DIR,
    Column,
    bootstrap_interval,
    markdown_table,
    mean,
    percentile,
    plot_latency,
    plot_throughput,
    write_json,
)
from refiners import METHODS, RefineConfig, Refiner, RefineRequest
from refiners.generation import BatchGenerator, SamplingParams
from refiners.models import LoadedModel
from refiners.padding import pad_ids

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (16, 32, 64, 128)
CONCURRENCY = (1, 4, 16, 64)
ARCHS = ("embedded", "gemma3", "llama-1b", "llama-8b")

# Real sizes of the Llama 3 models (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B).
_LLAMA3_COMMON = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128001,
)
LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-1b": dict(
        _LLAMA3_COMMON,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-8b": dict(
        _LLAMA3_COMMON,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        head_dim=128,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


# -- models --------------------------------------------------------------------------------------


def random_llama(arch: str, tokenizer: Any, device: str, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """A random-weight Llama with the real ``arch`` sizes, built directly on ``device`` in ``dtype``.

    The tokenizer (the embedded one) writes and reads the text; its ids all lie inside the 128k
    vocabulary, and the refiner never proposes ids past ``len(tokenizer)``.
    """
    from transformers import LlamaForCausalLM

    from refiners.models import prepare_model

    eos = int(tokenizer.eos_token_id)
    config = LlamaConfig(
        **{**LLAMA_CONFIGS[arch], "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id},
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: an 8B model is slow to initialise on CPU
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = eos
    return prepare_model(model, tokenizer, model_id=f"random-{arch}", device=device)


def load_tokenizer(arch: str, tokenizer_dir: str | None = None) -> Any:
    """The tokenizer alone: ``tokenizer_dir`` if given, else Gemma's for ``gemma3`` and the embedded
    model's for the others (a machine without the embedded GGUF, a GPU one, passes a copy of it)."""
    from transformers import AutoTokenizer

    from refiners.models import EMBEDDED_GEMMA, EMBEDDED_MODEL, model_path

    return AutoTokenizer.from_pretrained(
        tokenizer_dir or model_path(EMBEDDED_GEMMA if arch == "gemma3" else EMBEDDED_MODEL)
    )


def load_arch(
    arch: str, device: str, tokenizer_dir: str | None = None, pack_weights: bool = True
) -> LoadedModel:
    from refiners.models import EMBEDDED_GEMMA, EMBEDDED_MODEL, load_model

    if arch in ("embedded", "gemma3"):
        name = EMBEDDED_GEMMA if arch == "gemma3" else EMBEDDED_MODEL
        return load_model(name, device=device, pack_weights=pack_weights)
    return random_llama(arch, load_tokenizer(arch, tokenizer_dir), device)


def packed_linears(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's linear layers whose weights ``refiners.packed`` packed (none on a GPU)."""
    from refiners.packed import PackedLinear

    return [m for m in model.modules() if isinstance(m, PackedLinear)]


# -- part (a): latency breakdown -----------------------------------------------------------------


def exact_length(length: int) -> SamplingParams:
    """Greedy decoding that never stops at EOS before ``length`` tokens: every output has exactly
    ``length`` tokens (unless the context runs out). The server takes the same as ``min_new_tokens``."""
    return SamplingParams(max_new_tokens=length, min_new_tokens=length)


STEP_PARTS = ("prompt", "gradient", "propose", "lookahead", "scoring")


def hf_greedy(
    loaded: LoadedModel, prompts: Sequence[list[int]], length: int, pad: int, **kwargs: Any
) -> list[list[int]]:
    """``model.generate`` on ``prompts`` in one left-padded batch (``pad``), greedy, exactly ``length``
    new tokens (``kwargs`` go to ``generate``, e.g. ``cache_implementation``)."""
    ids, mask = pad_ids(prompts, pad, left=True, device=loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=False,
            pad_token_id=pad,
            **kwargs,
        )
    return out[:, ids.shape[1] :].tolist()


def freeze_start_up_objects() -> None:
    """What the server does once ready (app/service.py): the objects loading left are collected once
    and frozen, so no full garbage collection walks them in the middle of a timed step. For a
    benchmark's own process only (a library call must not change the collector for its caller)."""
    gc.collect()
    gc.freeze()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class Timing:
    """One request's times in process: our generation, ``model.generate`` on the same prompt (None when
    not measured), and each method's step with its parts."""

    generate_s: float
    hf_generate_s: float | None
    tokens: int
    refine_s: dict[str, float]
    parts: dict[str, dict[str, float]]
    output_ids: list[int]
    refined_ids: dict[str, list[int]]


class LatencyBench:
    """Times generation and each method's refinement, one request at a time, at fixed output lengths.

    Args:
        loaded: the model (any device).
        methods: refinement methods to time.
        items: concept sets whose prompts (and concepts, as keywords) are used, one request each.
        compare_hf: also time ``model.generate`` (greedy, the same length) on each prompt.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        methods: Sequence[str],
        items: Sequence[ConceptSet],
        compare_hf: bool = True,
    ):
        self.loaded = loaded
        self.methods = tuple(methods)
        self.items = list(items)
        self.generator = BatchGenerator(loaded)
        self.refiner = Refiner(loaded)
        self.compare_hf = compare_hf

    def _timed(self, fn: Any) -> tuple[float, Any]:
        device = self.loaded.device
        _sync(device)
        started = time.perf_counter()
        value = fn()
        _sync(device)
        return time.perf_counter() - started, value

    def time_request(self, item: ConceptSet, length: int) -> Timing:
        """One concept set's prompt generated to ``length`` tokens, then refined by each method."""
        prompt = prompt_ids(self.loaded.tokenizer, item)
        # keep_prompt_cache as the server does: the step reuses the prompt's cache.
        gen_s, [out] = self._timed(
            lambda: self.generator.generate([prompt], [exact_length(length)], keep_prompt_cache=True)
        )
        hf_s = None
        if self.compare_hf:
            pad = self.generator.pad_token_id
            hf_s = self._timed(lambda: hf_greedy(self.loaded, [prompt], length, pad))[0]
        refine_s, parts, refined = {}, {}, {}
        for method in self.methods:
            config = RefineConfig(method=method, keywords=item.concepts)
            request = RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache)
            refine_s[method], [result] = self._timed(lambda r=request: self.refiner.refine([r]))
            parts[method] = {part: getattr(result, f"{part}_seconds") for part in STEP_PARTS}
            refined[method] = list(result.refined_ids)
        return Timing(gen_s, hf_s, len(out.token_ids), refine_s, parts, list(out.token_ids), refined)

    def run(self, lengths: Sequence[int], warmup: int, arch: str) -> list[dict[str, Any]]:
        device = self.loaded.device
        rows = []
        for length in lengths:
            for w in range(warmup):  # not recorded: first-call allocations, kernels, caches
                self.time_request(self.items[w % len(self.items)], length)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = [self.time_request(item, length) for item in self.items]
            gen = [r.generate_s for r in runs]
            hf = [r.hf_generate_s for r in runs if r.hf_generate_s is not None]
            tokens = mean([r.tokens for r in runs])
            for method in self.methods:
                ref = [r.refine_s[method] for r in runs]
                rows.append(
                    {
                        "arch": arch,
                        "model": self.loaded.model_id,
                        "device": device.type,
                        "dtype": str(self.loaded.dtype).removeprefix("torch."),
                        "method": method,
                        "target_tokens": length,
                        "tokens_mean": tokens,
                        "requests": len(runs),
                        "generate_s": mean(gen),
                        "tokens_per_s": tokens / mean(gen),
                        "hf_generate_s": mean(hf) if hf else float("nan"),
                        "hf_tokens_per_s": tokens / mean(hf) if hf else float("nan"),
                        "refine_s": mean(ref),
                        "refine_s_each": ref,
                        "gradient_s_each": [r.parts[method]["gradient"] for r in runs],
                        **{f"{part}_s": mean([r.parts[method][part] for r in runs]) for part in STEP_PARTS},
                        "ratio": mean(ref) / mean(gen),
                        "ratio_mean_per_request": mean([r / g for r, g in zip(ref, gen, strict=True)]),
                        "peak_memory_mb": _peak_memory_mb(device),
                        "peak_memory_kind": "cuda max_memory_allocated"
                        if device.type == "cuda"
                        else "process RSS",
                    }
                )
                log.info(
                    "%s %s %d tokens %s: generate %.3f s (model.generate %.3f s), refine %.3f s (%.2fx)",
                    arch,
                    device.type,
                    length,
                    method,
                    rows[-1]["generate_s"],
                    rows[-1]["hf_generate_s"],
                    rows[-1]["refine_s"],
                    rows[-1]["ratio"],
                )
        return rows


LATENCY_TABLE = [
    Column("arch", "model"),
    Column("device", "device"),
    Column("target_tokens", "tokens"),
    Column("method", "method"),
    Column("requests", "n"),
    Column("tokens_per_s", "tok/s", ".1f"),
    Column("hf_tokens_per_s", "model.generate tok/s", ".1f"),
    Column("generate_s", "generate s", ".3f"),
    Column("refine_s", "refine s", ".3f"),
    *(Column(f"{part}_s", part, ".3f") for part in STEP_PARTS),
    Column("ratio", "refine/gen", ".2f"),
    Column("peak_memory_mb", "peak MiB", ".0f"),
]


# -- packed weights against plain ones --------------------------------------------------------------


def run_packing(
    arch: str, items: Sequence[ConceptSet], lengths: Sequence[int], warmup: int = 1
) -> list[dict]:
    """Linear weights packed once for oneDNN (``refiners.packed``, the default on a CPU) against the
    plain ``nn.Linear`` (MKL), side by side in one process: every prompt is generated and refined
    (coordinate) by both models in turn, the first alternating, at each length."""
    from refiners.models import EMBEDDED_GEMMA, EMBEDDED_MODEL, load_model

    name = EMBEDDED_GEMMA if arch == "gemma3" else EMBEDDED_MODEL
    benches = {
        packed: LatencyBench(
            load_model(name, device="cpu", pack_weights=packed), ["coordinate"], items, False
        )
        for packed in (True, False)
    }
    linears = packed_linears(benches[True].loaded.model)
    packed_mb = 2 * sum(m.weight.numel() * m.weight.element_size() for m in linears) / 2**20
    rows = []
    for length in lengths:
        for bench in benches.values():
            for w in range(warmup):
                bench.time_request(items[w % len(items)], length)
        runs: dict[bool, list[Timing]] = {True: [], False: []}
        for i, item in enumerate(items):
            for packed in (True, False) if i % 2 == 0 else (False, True):
                runs[packed].append(benches[packed].time_request(item, length))
        plain_gen = mean([r.generate_s for r in runs[False]])
        plain_ref = mean([r.refine_s["coordinate"] for r in runs[False]])
        for packed in (True, False):
            mine = runs[packed]
            gen, ref = mean([r.generate_s for r in mine]), mean([r.refine_s["coordinate"] for r in mine])
            tokens = mean([r.tokens for r in mine])
            same_out = [a.output_ids == b.output_ids for a, b in zip(mine, runs[False])]
            same_refined = [a.refined_ids == b.refined_ids for a, b in zip(mine, runs[False])]
            rows.append(
                {
                    "arch": arch,
                    "weights": "packed (oneDNN)" if packed else "plain (MKL)",
                    "target_tokens": length,
                    "requests": len(mine),
                    "tokens_per_s": tokens / gen,
                    "generate_s": gen,
                    "refine_s": ref,
                    **{f"{part}_s": mean([r.parts["coordinate"][part] for r in mine]) for part in STEP_PARTS},
                    "ratio": ref / gen,
                    "generate_speedup": plain_gen / gen,
                    "refine_speedup": plain_ref / ref,
                    "same_outputs": sum(same_out) / len(same_out),
                    "same_refined": sum(same_refined) / len(same_refined),
                    "packed_copies_mb": packed_mb if packed else 0.0,
                }
            )
            log.info("%d tokens %s: generate %.3f s, refine %.3f s", length, rows[-1]["weights"], gen, ref)
    return rows


PACKING_TABLE = [
    Column("target_tokens", "tokens"),
    Column("weights", "weights"),
    Column("requests", "n"),
    Column("tokens_per_s", "tok/s", ".1f"),
    Column("generate_s", "generate s", ".3f"),
    Column("refine_s", "refine s", ".3f"),
    *(Column(f"{part}_s", part, ".3f") for part in STEP_PARTS[1:]),
    Column("ratio", "refine/gen", ".2f"),
    Column("generate_speedup", "generate x", ".2f"),
    Column("refine_speedup", "refine x", ".2f"),
    Column("same_outputs", "same outputs", ".0%"),
    Column("same_refined", "same refined", ".0%"),
    Column("packed_copies_mb", "packed MiB", ".0f"),
]


# -- generation variants -------------------------------------------------------------------------


def run_generation_variants(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    length: int,
    plain: LoadedModel | None = None,
    compile_model: bool = True,
    rounds: int = 3,
) -> list[dict]:
    """Tokens per second of greedy decoding to exactly ``length`` tokens, one prompt at a time: our
    ``BatchGenerator``, ``model.generate`` (dynamic cache) and with a static cache. With ``plain``, the
    same model as transformers loads it (plain ``nn.Linear``; ``loaded`` has packed weights): ours and
    ``model.generate`` on it too, the decoding of before packing. Each variant's first call is timed
    apart; then, ``rounds`` times, every prompt runs through every variant in turn, the order reversed
    every other prompt, so a drift of the machine's speed falls on all of them alike. Last, with
    ``compile_model``, ``model.generate`` with a static cache and ``torch.compile`` (on ``plain`` when
    given: Inductor does not take the packed layers' oneDNN calls), its first call (which compiles)
    apart and then the prompts once. Whether every variant wrote the same tokens as ours is checked."""
    device = loaded.device
    generator = BatchGenerator(loaded)
    base = plain or loaded

    def ours(prompt: list[int], generator: BatchGenerator = generator) -> list[int]:
        return generator.generate([prompt], [exact_length(length)])[0].token_ids

    def hf(prompt: list[int], loaded: LoadedModel = loaded, **kwargs: Any) -> list[int]:
        return hf_greedy(loaded, [prompt], length, generator.pad_token_id, **kwargs)[0]

    def timed(fn: Any, prompt: list[int]) -> tuple[float, list[int]]:
        _sync(device)
        started = time.perf_counter()
        out = fn(prompt)
        _sync(device)
        return time.perf_counter() - started, out

    variants = [("BatchGenerator (ours)", ours), ("model.generate", hf)]
    if plain is not None:
        plain_generator = BatchGenerator(plain)
        variants += [
            ("BatchGenerator, plain weights", lambda p: ours(p, plain_generator)),
            ("model.generate, plain weights", lambda p: hf(p, plain)),
        ]
    variants.append(("model.generate, static cache", lambda p: hf(p, cache_implementation="static")))
    reference = [ours(p) for p in prompts]
    first = {name: timed(fn, prompts[0]) for name, fn in variants}
    seconds = dict.fromkeys(first, 0.0)
    same = {name: out == reference[0] for name, (_, out) in first.items()}
    for turn in range(rounds * len(prompts)):
        i = turn % len(prompts)
        for name, fn in variants if turn % 2 == 0 else variants[::-1]:
            took, out = timed(fn, prompts[i])
            seconds[name] += took
            same[name] = same[name] and out == reference[i]
    runs = {name: (rounds * len(prompts), seconds[name], first[name][0], same[name]) for name in seconds}
    if compile_model:
        name = f"model.generate{', plain weights' if plain else ''}, static cache, torch.compile"
        runs[name] = compiled_generation(
            base, prompts, reference, lambda p: hf(p, base, cache_implementation="static"), timed
        )
    ours_rate = rounds * len(prompts) * length / seconds["BatchGenerator (ours)"]
    rows = []
    for name, (calls, took, first_s, wrote_same) in runs.items():
        tokens = calls * length
        rows.append(
            {
                "variant": name,
                "prompts": len(prompts),
                "tokens": tokens,
                "tokens_per_s": tokens / took,
                "ms_per_token": 1000 * took / tokens,
                "speed_vs_ours": tokens / took / ours_rate,
                "first_call_s": first_s,
                "same_tokens_as_ours": wrote_same,
            }
        )
        log.info("%s: %.1f tokens/s (first call %.1f s)", name, rows[-1]["tokens_per_s"], first_s)
    return rows + batched_generation(loaded, prompts, length)


def compiled_generation(
    base: LoadedModel,
    prompts: Sequence[list[int]],
    reference: list[list[int]],
    generate: Callable[[list[int]], list[int]],
    timed: Callable[..., tuple[float, list[int]]],
) -> tuple[int, float, float, bool]:
    """``generate`` (``model.generate`` on ``base``) with ``base.model.forward`` compiled: its first
    call (which compiles) and then each prompt once; (calls, seconds, first call's seconds, whether it
    wrote ``reference``)."""
    eager_forward = base.model.forward
    base.model.forward = torch.compile(eager_forward)
    try:
        first_s, out = timed(generate, prompts[0])
        outs = [timed(generate, p) for p in prompts]
    finally:
        base.model.forward = eager_forward
    same = out == reference[0] and [o for _, o in outs] == reference
    return len(prompts), sum(t for t, _ in outs), first_s, same


def batched_generation(loaded: LoadedModel, prompts: Sequence[list[int]], length: int) -> list[dict]:
    """All ``prompts`` in one left-padded batch: our ``BatchGenerator`` against ``model.generate``, the
    fastest of three runs each, and whether they wrote the same tokens."""
    device = loaded.device
    generator = BatchGenerator(loaded)

    def ours() -> list[list[int]]:
        return [o.token_ids for o in generator.generate(prompts, [exact_length(length)] * len(prompts))]

    def hf() -> list[list[int]]:
        return hf_greedy(loaded, prompts, length, generator.pad_token_id)

    runs: dict[str, list[float]] = {"ours": [], "hf": []}
    outputs = {"ours": ours(), "hf": hf()}  # first calls, not timed
    for _ in range(3):
        for name, fn in (("ours", ours), ("hf", hf)):
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            runs[name].append(time.perf_counter() - started)
    tokens = len(prompts) * length
    best = {name: min(times) for name, times in runs.items()}
    return [
        {
            "variant": f"{label}, {len(prompts)} prompts in one batch",
            "prompts": len(prompts),
            "tokens": tokens,
            "tokens_per_s": tokens / best[name],
            "ms_per_token": 1000 * best[name] / tokens,
            "speed_vs_ours": best["ours"] / best[name],
            "first_call_s": float("nan"),
            "same_tokens_as_ours": outputs[name] == outputs["ours"],
        }
        for name, label in (("ours", "BatchGenerator (ours)"), ("hf", "model.generate"))
    ]


GENERATION_TABLE = [
    Column("variant", "decoding"),
    Column("prompts", "prompts"),
    Column("tokens", "tokens"),
    Column("tokens_per_s", "tok/s", ".1f"),
    Column("ms_per_token", "ms/token", ".1f"),
    Column("speed_vs_ours", "vs ours", ".2f"),
    Column("first_call_s", "first call s", ".1f"),
    Column("same_tokens_as_ours", "same tokens"),
]


# -- part (b): throughput through the HTTP server -----------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``refiner serve`` in a subprocess on a free loopback port, with ``REFINER_*`` settings in its env.

    Args:
        settings: environment overrides, e.g. ``{"REFINER_MAX_BATCH_SIZE": "1"}``.
        model: ``--model`` (None = the embedded model).
        device: ``--device``.
    """

    def __init__(self, settings: dict[str, str], model: str | None = None, device: str = "cpu"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **settings}
        cmd = [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            device,
            "--log-level",
            "warning",
        ]
        if model:
            cmd += ["--model", model]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not ready after {timeout_s} s:\n{self.output()}")

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory (VmHWM of its /proc status), MiB; NaN if unreadable."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def generate_bodies(
    texts: Sequence[str], concepts: Sequence[Sequence[str]], refine: bool, max_new_tokens: int
) -> list[dict[str, Any]]:
    """``POST /generate`` bodies: greedy, ``max_new_tokens``, refinement on (keywords) or off."""
    bodies = []
    for text, words in zip(texts, concepts, strict=True):
        refine_params: dict[str, Any] = {"enabled": refine}
        if refine:
            refine_params["keywords"] = list(words)
        bodies.append(
            {"inputs": text, "parameters": {"max_new_tokens": max_new_tokens, "refine": refine_params}}
        )
    return bodies


async def load_level(
    url: str, bodies: Sequence[dict[str, Any]], concurrency: int, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Send ``bodies`` with ``concurrency`` clients, each sending its next request when the previous
    one is answered. Returns requests/s, latency percentiles and error counts."""
    import httpx

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            started = time.perf_counter()
            try:
                response = await http.post("/generate", json=body)
                ok = response.status_code == 200
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                ok, key = False, type(exc).__name__
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "completed": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall if wall > 0 else float("nan"),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_mean_s": mean(latencies),
    }


def requests_for(concurrency: int, per_level: int | None, cap: int) -> int:
    """Requests sent at one concurrency level: ``per_level`` if given, else 2x the concurrency, capped."""
    return per_level if per_level else min(2 * concurrency, cap)


def run_throughput(
    prompts: Sequence[str],
    concepts: Sequence[Sequence[str]],
    levels: Sequence[int],
    batch_sizes: Sequence[int],
    refine_modes: Sequence[bool],
    max_new_tokens: int,
    per_level: int | None,
    cap: int,
    model: str | None = None,
    device: str = "cpu",
    server_env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Start one server per batch size and measure every (refinement, concurrency) level against it."""
    rows = []
    offset = 0  # each request of the run gets a distinct prompt (cycling when there are fewer prompts)
    for batch_size in batch_sizes:
        env = {
            "REFINER_MAX_BATCH_SIZE": str(batch_size),
            "REFINER_MAX_QUEUE": str(max(64, 2 * max(levels))),
            "REFINER_REQUEST_TIMEOUT_S": "900",
            "REFINER_MAX_NEW_TOKENS": str(max(max_new_tokens, 16)),
            **(server_env or {}),
        }
        server = ServerProcess(env, model=model, device=device)
        try:
            server.wait_ready()
            for refine in refine_modes:
                bodies_all = generate_bodies(prompts, concepts, refine, max_new_tokens)
                # One warm-up request: the first request pays one-off costs (allocations, lazy imports).
                asyncio.run(load_level(server.url, bodies_all[:1], 1))
                for c in levels:
                    n = requests_for(c, per_level, cap)
                    bodies = [bodies_all[(offset + k) % len(bodies_all)] for k in range(n)]
                    offset += n
                    row = asyncio.run(load_level(server.url, bodies, c))
                    row.update(
                        batching=batch_size > 1,
                        max_batch_size=batch_size,
                        refine=refine,
                        max_new_tokens=max_new_tokens,
                        device=device,
                        model=model or "embedded",
                    )
                    rows.append(row)
                    log.info(
                        "batch %d refine %s c=%d: %.2f req/s p50 %.2f s p95 %.2f s errors %s",
                        batch_size,
                        refine,
                        c,
                        row["requests_per_s"],
                        row["latency_p50_s"],
                        row["latency_p95_s"],
                        row["errors"] or "none",
                    )
            peak = server.peak_rss_mb()
            for row in rows:
                if row["max_batch_size"] == batch_size:
                    row["server_peak_rss_mb"] = peak
        finally:
            server.stop()
    return rows


def run_server_latency(
    texts: Sequence[str],
    concepts: Sequence[Sequence[str]],
    lengths: Sequence[int],
    model: str | None = None,
    device: str = "cpu",
    local: LatencyBench | None = None,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """Through ``refiner serve``, one request at a time: each prompt plain, then refined (keywords = its
    concepts), at exactly each length (``min_new_tokens``), ``repeats`` times over. Reports the client's
    wall times and the times the server reports in ``details.refinement``. With ``local`` (a bench over
    the same concept sets, in this process), each prompt is also generated and refined in process just
    before or after its server requests (in turn), so the server and the process are compared in one
    run, on one machine state, pair by pair."""
    import httpx

    env = {"REFINER_MAX_NEW_TOKENS": str(max(lengths)), "REFINER_REQUEST_TIMEOUT_S": "900"}
    # The server gets this process's memory allocator (tcmalloc when preloaded here), so that the
    # server and the in-process step are compared on the same one.
    env["REFINER_TCMALLOC"] = str("tcmalloc" in os.environ.get("LD_PRELOAD", "")).lower()
    server = ServerProcess(env, model=model, device=device)
    rows = []
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=900) as http:

            def post(text: str, words: Sequence[str], length: int, refine: bool) -> tuple[float, dict]:
                refine_params: dict[str, Any] = {"enabled": refine}
                if refine:
                    refine_params["keywords"] = list(words)
                body = {
                    "inputs": text,
                    "parameters": {
                        "max_new_tokens": length,
                        "min_new_tokens": length,
                        "details": True,
                        "refine": refine_params,
                    },
                }
                started = time.perf_counter()
                response = http.post("/generate", json=body)
                wall = time.perf_counter() - started
                response.raise_for_status()
                return wall, response.json()["details"]

            for length in lengths:
                post(texts[0], concepts[0], length, True)  # warm-up, not recorded
                if local is not None:
                    local.time_request(local.items[0], length)
                runs, here = [], []
                for rep in range(repeats):
                    for i, (text, words) in enumerate(zip(texts, concepts, strict=True)):
                        # Alternate which side goes first, so neither always follows the other's work.
                        local_first = local is not None and (i + rep) % 2 == 1
                        if local_first:
                            here.append(local.time_request(local.items[i], length))
                        plain_s, _ = post(text, words, length, False)
                        refined_s, details = post(text, words, length, True)
                        runs.append((plain_s, refined_s, details["generated_tokens"], details["refinement"]))
                        if local is not None and not local_first:
                            here.append(local.time_request(local.items[i], length))
                reports = [r[3] for r in runs]
                row = {
                    "target_tokens": length,
                    "requests": len(runs),
                    "tokens_mean": mean([r[2] for r in runs]),
                    "plain_request_s": mean([r[0] for r in runs]),
                    "refined_request_s": mean([r[1] for r in runs]),
                    "server_generate_s": mean([r["generate_seconds"] for r in reports]),
                    "server_refine_s": mean([r["refine_seconds"] for r in reports]),
                    **{
                        f"server_{part}_s": mean([r[f"{part}_seconds"] for r in reports])
                        for part in STEP_PARTS
                    },
                }
                row["refined_over_plain"] = row["refined_request_s"] / row["plain_request_s"]
                row["server_ratio"] = row["server_refine_s"] / row["server_generate_s"]
                if here:
                    row["in_process_generate_s"] = mean([t.generate_s for t in here])
                    row["in_process_refine_s"] = mean([t.refine_s["coordinate"] for t in here])
                    row["server_over_in_process_generate"] = (
                        row["server_generate_s"] / row["in_process_generate_s"]
                    )
                    row["server_over_in_process_refine"] = row["server_refine_s"] / row["in_process_refine_s"]
                    row.update(paired_ratios(reports, here))
                rows.append(row)
                log.info(
                    "server %d tokens: plain %.3f s, refined %.3f s (%.2fx); refine/generate %.2f",
                    length,
                    row["plain_request_s"],
                    row["refined_request_s"],
                    row["refined_over_plain"],
                    row["server_ratio"],
                )
        for row in rows:
            row["server_peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    return rows


def paired_ratios(reports: Sequence[dict[str, Any]], here: Sequence[Timing]) -> dict[str, float]:
    """Server over in-process time of the same prompt's step and generation, pair by pair: the median
    ratio and its 95% bootstrap interval (one request's noise is 5-15% on this CPU, so a ratio of sums
    over a few requests could not say whether the two differ by 5%)."""
    out: dict[str, float] = {}
    for part, server_key, local_time in (
        ("refine", "refine_seconds", lambda t: t.refine_s["coordinate"]),
        ("generate", "generate_seconds", lambda t: t.generate_s),
    ):
        ratios = [r[server_key] / local_time(t) for r, t in zip(reports, here, strict=True)]
        out[f"paired_{part}_ratios"] = ratios
        out.update(median_interval(ratios, f"paired_{part}"))
    return out


def median_interval(ratios: Sequence[float], name: str) -> dict[str, float]:
    low, high = bootstrap_interval(ratios, np.median)
    return {f"{name}_median": float(np.median(ratios)), f"{name}_low": low, f"{name}_high": high}


SERVER_TABLE = [
    Column("target_tokens", "tokens"),
    Column("requests", "n"),
    Column("plain_request_s", "plain request s", ".3f"),
    Column("refined_request_s", "refined request s", ".3f"),
    Column("refined_over_plain", "refined/plain", ".2f"),
    Column("server_generate_s", "server generate s", ".3f"),
    Column("server_refine_s", "server refine s", ".3f"),
    *(Column(f"server_{part}_s", part, ".3f") for part in STEP_PARTS),
    Column("server_ratio", "refine/gen", ".2f"),
    Column("in_process_refine_s", "in-process refine s", ".3f"),
    Column("server_over_in_process_refine", "server/in-process refine", ".2f"),
    Column("server_over_in_process_generate", "server/in-process generate", ".2f"),
    Column("paired_refine_median", "paired refine median", ".3f"),
    Column("paired_refine_low", "low", ".3f"),
    Column("paired_refine_high", "high", ".3f"),
    Column("paired_generate_median", "paired generate median", ".3f"),
]


THROUGHPUT_TABLE = [
    Column("batching_label", "batching"),
    Column("refine_label", "refine"),
    Column("concurrency", "clients"),
    Column("completed", "requests"),
    Column("errors_total", "errors"),
    Column("requests_per_s", "req/s", ".2f"),
    Column("latency_p50_s", "p50 s", ".2f"),
    Column("latency_p95_s", "p95 s", ".2f"),
    Column("speedup", "req/s vs batching off", ".2f"),
    Column("server_peak_rss_mb", "server peak RSS MiB", ".0f"),
]


def _label_throughput(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    off = {(r["refine"], r["concurrency"]): r["requests_per_s"] for r in rows if not r["batching"]}
    for r in rows:
        r["batching_label"] = f"on ({r['max_batch_size']})" if r["batching"] else "off (1)"
        r["refine_label"] = "yes" if r["refine"] else "no"
        r["errors_total"] = sum(r["errors"].values())
        base = off.get((r["refine"], r["concurrency"]))
        r["speedup"] = r["requests_per_s"] / base if base else float("nan")
    return rows


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=["latency", "server", "generation", "throughput", "packing", "all"],
        default="all",
        help="packing: packed linear weights against plain ones (CPU; not part of all)",
    )
    parser.add_argument("--arch", choices=ARCHS, default="embedded")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory for llama-1b/8b (default: the embedded one)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="output tokens")
    parser.add_argument(
        "--requests", type=int, default=3, help="latency and server: requests (prompts) per length"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="server: times each prompt is sent (and run in process)"
    )
    parser.add_argument("--no-hf", action="store_true", help="latency: do not time model.generate")
    parser.add_argument("--no-compile", action="store_true", help="generation: leave out torch.compile")
    parser.add_argument(
        "--rounds", type=int, default=3, help="generation: times each prompt runs per variant"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="latency warm-up runs (default 1 CPU, 3 CUDA)"
    )
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(CONCURRENCY))
    parser.add_argument(
        "--requests-per-level",
        type=int,
        default=None,
        help="throughput requests per concurrency level (default 2x clients, capped)",
    )
    parser.add_argument(
        "--max-requests-per-level",
        type=int,
        default=32,
        help="cap of the default requests per level (keeps a CPU run short)",
    )
    parser.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[1, 8],
        help="server REFINER_MAX_BATCH_SIZE values (1 = batching off)",
    )
    parser.add_argument("--no-refine-only", action="store_true", help="throughput without refinement only")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="throughput: tokens per request")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/speed-<arch>-<device>)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per health poll and request
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu", file=sys.stderr)
        return 2
    out = args.out or RESULTS_DIR / f"speed-{args.arch}-{args.device}.json"
    result: dict[str, Any] = {"arch": args.arch, "device": args.device}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    if out.is_file():  # keep the other part's results when only one part is rerun
        previous = json.loads(out.read_text())
        parts = ("latency", "server", "generation", "throughput", "packing")
        result.update({k: previous[k] for k in parts if k in previous})
    items_needed = max(args.requests, 64)
    items = load_concept_sets(items_needed)

    if args.part in ("latency", "all"):
        loaded = load_arch(args.arch, args.device, args.tokenizer)
        warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
        bench = LatencyBench(loaded, args.methods, items[: args.requests], compare_hf=not args.no_hf)
        freeze_start_up_objects()
        rows = bench.run(args.lengths, warmup=warmup, arch=args.arch)
        result["latency"] = {
            "settings": {
                "lengths": args.lengths,
                "requests": args.requests,
                "warmup": warmup,
                "methods": args.methods,
            },
            "rows": rows,
        }
        del bench, loaded
        print(f"\nLatency per request ({args.arch}, {args.device})\n")
        print(markdown_table(rows, LATENCY_TABLE))
        plot_latency(
            out.with_name(out.stem + "-latency.png"),
            rows,
            f"Generation vs refinement time per request ({args.arch}, {args.device})",
        )

    if args.part == "packing":
        if args.device != "cpu" or args.arch not in ("embedded", "gemma3"):
            print(
                "--part packing compares CPU float32 models: embedded or gemma3, --device cpu",
                file=sys.stderr,
            )
            return 2
        rows = run_packing(args.arch, items[: args.requests], args.lengths)
        result["packing"] = {"settings": {"lengths": args.lengths, "requests": args.requests}, "rows": rows}
        print(f"\nPacked against plain linear weights, same prompts in turn ({args.arch}, cpu)\n")
        print(markdown_table(rows, PACKING_TABLE))

    if args.part in ("generation", "all"):
        loaded = load_arch(args.arch, args.device, args.tokenizer)
        length = max(args.lengths)
        prompts = [prompt_ids(loaded.tokenizer, it) for it in items[: args.requests]]
        # On a CPU the loaded model's weights are packed; the same model unpacked is the baseline.
        plain = (
            load_arch(args.arch, args.device, args.tokenizer, pack_weights=False)
            if packed_linears(loaded.model)
            else None
        )
        rows = run_generation_variants(loaded, prompts, length, plain, not args.no_compile, args.rounds)
        del plain
        result["generation"] = {"settings": {"length": length, "prompts": len(prompts)}, "rows": rows}
        del loaded
        print(f"\nGreedy decoding to {length} tokens, one prompt at a time, then all in one batch", end=" ")
        print(f"({args.arch}, {args.device})\n")
        print(markdown_table(rows, GENERATION_TABLE))

    if args.part not in ("server", "throughput", "all"):
        write_json(out, result)
        print(f"\nwrote {out}")
        return 0
    tokenizer = load_tokenizer(args.arch, args.tokenizer)
    texts = [prompt_text(tokenizer, it) for it in items]
    with served_model(args.arch, args.device, args.tokenizer) as model:
        if args.part in ("server", "all"):
            n = args.requests
            local = LatencyBench(
                load_arch(args.arch, args.device, args.tokenizer), ["coordinate"], items[:n], False
            )
            freeze_start_up_objects()
            rows = run_server_latency(
                texts[:n],
                [it.concepts for it in items[:n]],
                args.lengths,
                model,
                args.device,
                local,
                args.repeats,
            )
            del local
            result["server"] = {
                "settings": {"lengths": args.lengths, "requests": n, "repeats": args.repeats},
                "rows": rows,
            }
            print(f"\nOne request at a time through the HTTP server ({args.arch}, {args.device})\n")
            print(markdown_table(rows, SERVER_TABLE))
            # The worker thread's cost, if any, is a share of the step: pool every length's pairs.
            pooled = median_interval([x for r in rows for x in r["paired_refine_ratios"]], "pooled")
            result["server"]["pooled_refine_ratio"] = pooled
            print(
                "\nserver/in-process step, all pairs: median {pooled_median:.3f} [{pooled_low:.3f}, "
                "{pooled_high:.3f}]".format(**pooled)
            )
        if args.part in ("throughput", "all"):
            run_throughput_part(args, result, out, texts, [it.concepts for it in items], model)

    write_json(out, result)
    print(f"\nwrote {out}")
    return 0


@contextlib.contextmanager
def served_model(arch: str, device: str, tokenizer_dir: str | None = None) -> Iterator[str | None]:
    """What ``refiner serve --model`` loads: None for the embedded model; a random-weight Llama is saved
    to a temporary directory once."""
    if arch in ("embedded", "gemma3"):
        from refiners.models import EMBEDDED_GEMMA

        yield EMBEDDED_GEMMA if arch == "gemma3" else None
        return
    with tempfile.TemporaryDirectory(prefix=f"refiner-{arch}-") as tmpdir:
        loaded = load_arch(arch, device, tokenizer_dir)
        loaded.model.save_pretrained(tmpdir)
        loaded.tokenizer.save_pretrained(tmpdir)
        del loaded
        if device == "cuda":
            torch.cuda.empty_cache()
        yield tmpdir


def run_throughput_part(
    args: argparse.Namespace,
    result: dict[str, Any],
    out: Path,
    texts: list[str],
    concepts: list[tuple[str, ...]],
    model: str | None,
) -> None:
    refine_modes = [False] if args.no_refine_only else [False, True]
    rows = run_throughput(
        texts,
        concepts,
        args.concurrency,
        args.batch_sizes,
        refine_modes,
        args.max_new_tokens,
        args.requests_per_level,
        args.max_requests_per_level,
        model=model,
        device=args.device,
    )
    rows = _label_throughput(rows)
    result["throughput"] = {
        "settings": {
            "concurrency": args.concurrency,
            "batch_sizes": args.batch_sizes,
            "max_new_tokens": args.max_new_tokens,
            "requests_per_level": args.requests_per_level,
            "max_requests_per_level": args.max_requests_per_level,
        },
        "rows": rows,
    }
    print(f"\nThroughput through the HTTP server ({args.arch}, {args.device})\n")
    print(markdown_table(rows, THROUGHPUT_TABLE))
    plot_throughput(
        out.with_name(out.stem + "-throughput.png"),
        rows,
        f"POST /generate throughput ({args.arch}, {args.device}, {args.max_new_tokens} tokens)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
