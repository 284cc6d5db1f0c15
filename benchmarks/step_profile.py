"""Where one refinement step's host work goes: kernel launches and syncs by part, in the model or not.

On a GPU a small model's step is bound by the host: each kernel launch costs microseconds whatever
its size. This runs the step (default settings, CommonGen prompts and concepts as keywords, greedy
outputs of ``--length`` tokens) under ``torch.profiler`` and counts, for each part the refiner labels
(``refine.<part>``), the launches made inside a model forward and those made by the refiner's own
tensor work, with the operators that made the most of the latter. On a CPU it counts the operators that
would launch a kernel (views and allocations left out), a proxy of the same. Wall times come from
unprofiled runs of the same requests.

    python -m benchmarks.step_profile --arch llama-1b --device cuda --tokenizer .gpu/tokenizer
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.commongen import load_concept_sets, prompt_ids
from benchmarks.report import RESULTS_DIR, Column, markdown_table, write_json
from benchmarks.speed import ARCHS, STEP_PARTS, exact_length, freeze_start_up_objects, load_arch
from refiners import RefineConfig, Refiner, RefineRequest
from refiners.generation import BatchGenerator

LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cuLaunchKernel"}
SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
# CPU operators that launch nothing on a GPU: views, shape changes and allocations.
NO_KERNEL = {
    *(
        f"aten::{op}"
        for op in "as_strided view reshape _reshape_alias _unsafe_view slice narrow select".split()
    ),
    *(f"aten::{op}" for op in "transpose t permute expand unsqueeze squeeze alias detach detach_".split()),
    *(f"aten::{op}" for op in "unbind split chunk flatten unflatten movedim numpy_T lift_fresh".split()),
    *(f"aten::{op}" for op in "empty empty_strided empty_like result_type resolve_conj resolve_neg".split()),
    "detach_",
    "aten::to",  # a leaf "to" converts nothing (a conversion shows as its copy_)
}
BACKWARD = "autograd::engine::evaluate_function"
MODEL = "model.forward"
OUTSIDE = "outside the parts"  # refine()'s own work between them
TABLE = [
    Column("part", "part"),
    Column("wall_ms", "wall ms", ".1f"),
    Column("model_launches", "model forward"),
    Column("backward_launches", "backward"),
    Column("refiner_launches", "refiner's own"),
    Column("syncs", "syncs"),
    Column("top_refiner_ops", "refiner's top operators"),
]


def _label_model(model: torch.nn.Module) -> None:
    """Mark every forward of the model and of its body, so launches inside them are told apart."""
    for module in {model, model.get_decoder()}:
        forward = module.forward

        def labelled(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            with record_function(MODEL):
                return _forward(*args, **kwargs)

        module.forward = labelled


def _where(event: Any, cuda: bool) -> tuple[str, str, str]:
    """(the refiner part an event ran in, where: "model", "backward" or "refiner", its operator)."""
    part, where, op, parent = None, "refiner", None if cuda else event.name, event.cpu_parent
    while parent is not None:
        name = parent.name
        if name == MODEL or name.startswith(BACKWARD):
            where = "backward" if name.startswith(BACKWARD) else "model"
        if part is None and name.startswith("refine."):
            part = name.removeprefix("refine.")
        if op is None and name.startswith("aten::"):
            op = name
        parent = parent.cpu_parent
    if part is None:  # on a GPU the backward runs on autograd's device thread, outside every label
        part = "gradient" if where == "backward" else OUTSIDE
    return part, where, op or event.name


def count(events: Any, cuda: bool) -> dict[str, collections.Counter]:
    """Per part: launches in model forwards, in the backward, the refiner's own by operator, syncs."""
    parts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if cuda:
            kind = "launch" if e.name in LAUNCHES else "sync" if e.name in SYNCS else None
        else:  # a leaf operator that computes something
            is_op = e.name.startswith("aten::") and e.name not in NO_KERNEL
            leaf = not any(c.name.startswith("aten::") for c in e.cpu_children)
            kind = "launch" if is_op and leaf else None
        if kind is None:
            continue
        part, where, op = _where(e, cuda)
        if kind == "sync":
            parts[part]["syncs"] += 1
        elif where == "refiner":
            parts[part][op] += 1
        else:
            parts[part][f"<{where}>"] += 1
    return parts


def profile_steps(
    refiner: Refiner, requests: list[RefineRequest], cuda: bool
) -> dict[str, collections.Counter]:
    """``count`` summed over one profiled step of each request (the model's forwards labelled)."""
    _label_model(refiner.runner.model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for request in requests:
        with profile(activities=activities) as prof:
            refiner.refine([request])
            if cuda:
                torch.cuda.synchronize()
        for part, counts in count(prof.events(), cuda).items():
            totals[part].update(counts)
    if not any(totals.values()):  # a profiler that names its launch events otherwise: say what it saw
        names = collections.Counter(e.name for e in prof.events())
        print("no launches found; the last profile's most frequent events:", names.most_common(30))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", choices=ARCHS, default="embedded")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for llama-1b/8b")
    parser.add_argument("--length", type=int, default=64, help="output tokens")
    parser.add_argument("--requests", type=int, default=4, help="prompts, each profiled once")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    loaded = load_arch(args.arch, args.device, args.tokenizer)
    generator, refiner = BatchGenerator(loaded), Refiner(loaded)
    freeze_start_up_objects()
    requests = []
    for item in load_concept_sets(args.requests + 1):
        prompt = prompt_ids(loaded.tokenizer, item)
        [out] = generator.generate([prompt], [exact_length(args.length)], keep_prompt_cache=True)
        config = RefineConfig(keywords=item.concepts)
        requests.append(RefineRequest(prompt, list(out.token_ids), config, out.prompt_cache))
    warmup, requests = requests[0], requests[1:]
    for _ in range(3):
        refiner.refine([warmup])

    def step(request: RefineRequest) -> Any:
        [result] = refiner.refine([request])
        if cuda:
            torch.cuda.synchronize()
        return result

    timed = [step(r) for r in requests for _ in range(2)]
    totals = profile_steps(refiner, requests, cuda)
    n = len(requests)
    rows = []
    for part in [*STEP_PARTS, *(p for p in totals if p not in STEP_PARTS)]:
        t = totals[part]
        own = collections.Counter({op: k for op, k in t.items() if op.startswith("aten::")})
        rows.append(
            {
                "part": part,
                "wall_ms": 1000 * statistics.median([getattr(r, f"{part}_seconds") for r in timed])
                if part in STEP_PARTS
                else None,
                "model_launches": round(t["<model>"] / n),
                "backward_launches": round(t["<backward>"] / n),
                "refiner_launches": round(sum(own.values()) / n),
                "syncs": round(t["syncs"] / n),
                "refiner_ops": {op: round(k / n, 1) for op, k in own.most_common()},
                "top_refiner_ops": ", ".join(
                    f"{op.removeprefix('aten::')} {round(k / n)}" for op, k in own.most_common(5)
                ),
            }
        )
    print(
        f"\nOne step's launches a request ({args.arch}, {args.device}, {args.length} tokens, {n} requests)\n"
    )
    print(markdown_table(rows, TABLE))
    out = args.out or RESULTS_DIR / f"step-profile-{args.arch}-{args.device}.json"
    write_json(
        out, {"arch": args.arch, "device": args.device, "length": args.length, "requests": n, "rows": rows}
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
