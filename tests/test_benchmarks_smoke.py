"""The benchmark code paths run end to end on 2 concept sets with tiny random models.

No real judge and no timing assertions: a tiny random Llama stands in for the judge, and the numbers
are only checked for shape and for the invariants the benchmark itself reports (a refinement never
lowers the objective).
"""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import (
    allocator,
    batching,
    human_reference,
    quality,
    reference,
    speed,
    step_batch,
    step_profile,
)
from benchmarks.commongen import (
    SLICES,
    concept_coverage,
    load_concept_sets,
    load_slice,
    parse_concepts,
    prompt_ids,
)
from benchmarks.judge import Judge
from benchmarks.report import (
    Column,
    bootstrap_interval,
    markdown_table,
    plot_latency,
    plot_quality,
    plot_throughput,
    write_json,
)
from refiners import Refiner
from refiners.config import RefineConfig
from refiners.generation import BatchGenerator, SamplingParams
from refiners.refiner import RefineRequest
from tests.conftest import start_server
from tests.tiny_models import embedded_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama(tokenizer, seed=0)


@pytest.fixture(scope="module")
def tiny_judge(tokenizer) -> Judge:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    return Judge(LlamaForCausalLM(config), tokenizer, batch_size=3)


def test_concept_sets_parse_and_prompt_through_the_chat_template(tokenizer):
    items = load_concept_sets(2)
    assert [len(i.concepts) for i in items] == [3, 3] and items[0].concepts == ("field", "look", "stand")
    assert parse_concepts("dance_V#kid_N#room_N") == ("dance", "kid", "room")
    text = tokenizer.decode(prompt_ids(tokenizer, items[0]))
    assert "Write one short sentence that uses all of these words: field, look, stand." in text
    assert text.rstrip().endswith("assistant")
    assert concept_coverage(("dance", "kid"), "Kids were dancing.") == 1.0
    assert concept_coverage(("dance", "kid"), "A kidney.") == 0.0


def test_judge_perplexity_is_per_text_and_independent_of_batching(tiny_judge):
    texts = ["A dog runs in the field.", "", "Cats sleep.", "The kid dances in the room today."]
    ppl = tiny_judge.perplexity(texts)
    assert len(ppl) == 4 and all(p > 0 for i, p in enumerate(ppl) if i != 1)
    one_by_one = [tiny_judge.perplexity([t])[0] for t in texts]
    for a, b in zip(ppl, one_by_one, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4)


def test_quality_run_reports_every_condition_without_lowering_the_objective(tiny, tiny_judge, tmp_path):
    items = load_concept_sets(2)
    settings = quality.QualitySettings(
        methods=("coordinate", "gradient", "hybrid"), max_new_tokens=6, candidates=4
    )
    records = tmp_path / "q.records.jsonl"
    result = quality.run(tiny, Refiner(tiny), tiny_judge.perplexity, items, settings, records_path=records)
    names = [row["condition"] for row in result["summary"]]
    assert names[:4] == ["greedy", "greedy + coordinate", "greedy + gradient", "greedy + hybrid"]
    assert names[4:8] == ["sampled", "sampled + coordinate", "sampled + gradient", "sampled + hybrid"]
    assert names[8] == f"best_of={result['settings']['best_of']}" and result["settings"]["best_of"] >= 2
    for row in result["summary"]:
        assert row["prompts"] == 2 and 0 <= row["coverage"] <= 1
        if "+" in row["condition"]:
            assert row["objective_decreased_reported_frac"] == 0.0
    # Rescored as generated, a refined output scores no lower than its initial one whenever the initial
    # ids round-trip through the tokenizer (otherwise the refiner starts from the re-encoded text).
    for name, recs in result["records"].items():
        if "+" in name:
            initial = {r["index"]: r for r in result["records"][name.split(" + ")[0]]}
            for r in recs:
                if initial[r["index"]]["round_trips"]:
                    assert r["objective"] >= initial[r["index"]]["objective"] - quality.OBJECTIVE_TOLERANCE
    assert len(records.read_text().splitlines()) == 4  # 2 items + 2 best_of records
    # Resuming reuses the records instead of generating again.
    again = quality.run(
        tiny, Refiner(tiny), tiny_judge.perplexity, items, settings, records_path=records, resume=True
    )
    assert again["records"]["greedy"][0]["text"] == result["records"]["greedy"][0]["text"]
    table = markdown_table(result["summary"], quality.TABLE)
    assert "greedy + coordinate" in table
    path = write_json(tmp_path / "q.json", result)
    assert json.loads(path.read_text())["machine"]["cpu_count"] >= 1
    assert plot_quality(tmp_path / "q.png", result["summary"], "smoke").stat().st_size > 0


def test_human_sentences_are_judged_beside_a_runs_texts(tiny_judge, tmp_path):
    items = load_concept_sets(2)
    records = tmp_path / "run.records.jsonl"
    lines = [{"kind": "best_of", "index": 0}]  # a run's other records are skipped
    for item in items:
        texts = {"greedy": "A dog.", "greedy + coordinate": "A dog: " + ", ".join(item.concepts) + "."}
        lines.append(
            {"kind": "item", "index": item.index, "records": {c: {"text": t} for c, t in texts.items()}}
        )
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    concepts, texts = human_reference.read_texts(records)
    assert list(texts) == ["greedy", "greedy + coordinate", human_reference.HUMAN]
    assert texts[human_reference.HUMAN] == [item.references[0] for item in items]
    rows = {r["condition"]: r for r in human_reference.summarise(concepts, texts, tiny_judge.perplexity)}
    assert rows["greedy"]["coverage"] == 0.0 and rows["greedy"]["ppl_vs_greedy_pct"] == 0.0
    assert rows["greedy + coordinate"]["every_concept"] == 1.0
    assert rows[human_reference.HUMAN]["sets"] == 2 and rows[human_reference.HUMAN]["judge_ppl_median"] > 0
    assert "human (first sentence)" in markdown_table(list(rows.values()), human_reference.TABLE)


def test_latency_bench_forces_the_output_length(tiny, tmp_path):
    items = load_concept_sets(2)
    rows = speed.LatencyBench(tiny, ["coordinate", "gradient"], items).run([5, 9], warmup=0, arch="tiny")
    assert [(r["target_tokens"], r["method"]) for r in rows] == [
        (5, "coordinate"),
        (5, "gradient"),
        (9, "coordinate"),
        (9, "gradient"),
    ]
    assert all(r["tokens_mean"] == r["target_tokens"] and r["generate_s"] > 0 for r in rows)
    assert markdown_table(rows, speed.LATENCY_TABLE).count("\n") == 5
    assert plot_latency(tmp_path / "l.png", rows, "smoke").stat().st_size > 0


def test_allocator_bench_measures_natural_answers_and_pairs_allocators_round_by_round(
    tiny, monkeypatch, tmp_path
):
    monkeypatch.setattr("refiners.models.load_model", lambda name, device="cpu": tiny)
    measured = allocator.measure("tiny", 2)
    assert set(measured) == {"generate_s", "step_s", "faults", "rss_mb"}
    assert measured["generate_s"] > 0 and measured["step_s"] > 0
    # The parent: one fresh process per round, model and allocator (here faked), paired by round.
    steps = iter([1.0, 0.9, 0.8, 1.0])  # round 0: glibc then tcmalloc; round 1: the other way round
    calls = []

    def child(model, sets, name):
        calls.append(name)
        return {"generate_s": 2.0, "step_s": next(steps), "faults": 1.0, "rss_mb": 5.0}

    monkeypatch.setattr(allocator, "run_child", child)
    monkeypatch.setattr(allocator, "tcmalloc_environment", lambda env: {**env, "LD_PRELOAD": "tc.so"})
    assert allocator.main(["--models", "m", "--rounds", "2", "--out", str(tmp_path / "a.json")]) == 0
    assert calls == ["glibc", "tcmalloc", "tcmalloc", "glibc"]
    glibc, tcmalloc = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert tcmalloc["step_vs_glibc_each"] == pytest.approx([0.9, 0.8])
    assert glibc["ratio"] == pytest.approx(0.5) and tcmalloc["step_s"] == pytest.approx(0.85)


def test_server_and_in_process_times_are_compared_pair_by_pair():
    here = [speed.Timing(g, None, 8, {"coordinate": r}, {}, [], {}) for g, r in [(1, 2), (2, 1), (4, 4)]]
    reports = [
        {"generate_seconds": 1.1, "refine_seconds": 2.2},
        {"generate_seconds": 2.2, "refine_seconds": 1.0},
    ]
    reports.append({"generate_seconds": 4.4, "refine_seconds": 4.2})
    ratios = speed.paired_ratios(reports, here)
    assert ratios["paired_generate_median"] == pytest.approx(1.1)
    assert ratios["paired_refine_median"] == pytest.approx(1.05)  # of 1.1, 1.0 and 1.05
    assert ratios["paired_refine_low"] <= 1.05 <= ratios["paired_refine_high"]


def test_step_batch_times_each_batch_size_and_its_parts(tiny):
    items = load_concept_sets(2)
    prompts = [prompt_ids(tiny.tokenizer, it) for it in items]
    outputs = BatchGenerator(tiny).generate(prompts, [speed.exact_length(6)] * 2)
    requests = [
        RefineRequest(p, o.token_ids, RefineConfig(keywords=tuple(it.concepts)))
        for p, o, it in zip(prompts, outputs, items, strict=True)
    ]
    rows = [step_batch.measure(Refiner(tiny), requests[:n], repeats=2, device="cpu") for n in (1, 2)]
    assert [r["requests"] for r in rows] == [1, 2]
    assert all(r["refine_s"] == min(r["runs_s"]) > 0 and len(r["runs_s"]) == 2 for r in rows)
    assert all(sum(r[part] for part in speed.STEP_PARTS) <= r["refine_s"] for r in rows)
    assert markdown_table(rows, step_batch.TABLE).count("\n") == 3


def test_step_profile_counts_each_parts_work_in_the_model_the_backward_and_the_refiner(tiny):
    item = load_concept_sets(1)[0]
    prompt = prompt_ids(tiny.tokenizer, item)
    [output] = BatchGenerator(tiny).generate([prompt], [speed.exact_length(8)])
    request = RefineRequest(prompt, output.token_ids, RefineConfig(keywords=tuple(item.concepts)))
    totals = step_profile.profile_steps(Refiner(tiny), [request], cuda=False)
    assert set(totals) <= {*speed.STEP_PARTS, step_profile.OUTSIDE}
    gradient = totals["gradient"]
    assert gradient["<model>"] > 0 and gradient["<backward>"] > 0 and gradient["syncs"] == 0
    assert sum(k for op, k in totals["prompt"].items() if op.startswith("aten::")) > 0


def test_throughput_client_counts_requests_and_errors(tiny, tmp_path):
    tok = tiny.tokenizer
    items = load_concept_sets(2)
    texts = [tok.decode(prompt_ids(tok, it)) for it in items]
    server = start_server(tiny, max_batch_size=4)
    try:
        rows = []
        for refine in (False, True):
            bodies = speed.generate_bodies(texts, [it.concepts for it in items], refine, max_new_tokens=4)
            row = asyncio.run(speed.load_level(server.url, bodies * 2, concurrency=2))
            row.update(batching=True, max_batch_size=4, refine=refine)
            rows.append(row)
        bad = asyncio.run(speed.load_level(server.url, [{"inputs": ""}], concurrency=1))
    finally:
        server.stop()
    assert all(r["completed"] == 4 and not r["errors"] and r["requests_per_s"] > 0 for r in rows)
    assert bad["completed"] == 0 and bad["errors"] == {"422": 1}
    rows = speed._label_throughput(rows + [dict(rows[0], batching=False, max_batch_size=1)])
    assert "on (4)" in markdown_table(rows, speed.THROUGHPUT_TABLE)
    assert plot_throughput(tmp_path / "t.png", rows, "smoke").stat().st_size > 0


def test_batching_benchmark_reads_batch_sizes_from_two_real_servers(tmp_path):
    out = tmp_path / "batching.json"
    assert (
        batching.main(
            ["--windows", "20", "--batch-size", "4", "--clients", "2", "--requests", "4", "--out", str(out)]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["max_batch_size"], r["refine"]) for r in rows] == [
        (1, False),
        (1, True),
        (4, False),
        (4, True),
    ]
    for row in rows:
        assert not row["errors"] and row["batches"] >= 1
        assert 1 <= row["mean_batch_size"] <= row["max_batch_size"]
    assert all(r["batches"] == 4 for r in rows if r["max_batch_size"] == 1)  # batching off: one job a batch


def test_random_llama_configs_have_the_real_sizes():
    one, eight = speed.LLAMA_CONFIGS["llama-1b"], speed.LLAMA_CONFIGS["llama-8b"]
    assert (one["hidden_size"], one["num_hidden_layers"], one["intermediate_size"]) == (2048, 16, 8192)
    assert (eight["hidden_size"], eight["num_hidden_layers"], eight["intermediate_size"]) == (4096, 32, 14336)
    assert one["vocab_size"] == eight["vocab_size"] == 128256


def test_report_table_prints_missing_values_as_dashes():
    table = markdown_table(
        [{"a": 1.0, "b": float("nan")}, {"a": 2.5}], [Column("a", "A", ".1f"), Column("b", "B")]
    )
    assert table.splitlines()[2] == "| 1.0 | - |"


def test_sweep_compares_search_configs_on_the_same_outputs(tiny):
    from benchmarks import sweep

    settings = {
        "defaults": {},
        "longer lookahead": {"lookahead_tokens": 3},
        "request": {"weights": {"fluency": 1.0}, "candidates": 4},
    }
    rows = sweep.run(tiny, load_concept_sets(2), settings, max_new_tokens=6)
    assert [r["setting"] for r in rows] == ["defaults", "longer lookahead", "request"]
    assert rows[0]["coverage_before"] == rows[1]["coverage_before"]  # one initial output per item
    assert all(r["prompts"] == 2 and r["objective_gain_mean"] >= 0 and r["refine_s_mean"] > 0 for r in rows)
    assert all(math.isfinite(r["own_ppl_change_pct"]) for r in rows)
    assert rows[0]["same_as_first"] == 2 and all(0 <= r["same_as_first"] <= 2 for r in rows)
    assert "longer lookahead" in markdown_table(rows, sweep.TABLE)
    with pytest.raises(SystemExit, match="no_such_field"):
        sweep.run(tiny, load_concept_sets(1), {"bad": {"no_such_field": 1}}, max_new_tokens=4)


def test_rewrite_after_edit_generates_the_words_after_the_last_edit_again(tiny):
    from benchmarks import rewrite_after_edit as rewrite

    assert rewrite.changed_prefix([1, 2, 3, 4], [1, 9, 3, 4]) == [1, 9]
    assert rewrite.changed_prefix([1, 2], [1, 2, 7]) == [1, 2, 7]  # an insertion at the end
    generator, [item] = BatchGenerator(tiny), load_concept_sets(1)
    prompt = prompt_ids(tiny.tokenizer, item)
    [out] = generator.generate([prompt], [SamplingParams(max_new_tokens=10)])
    initial = list(out.token_ids)
    edited = [*initial[:2], 3012, *initial[3:]]  # one word replaced, words after it
    [again] = generator.generate([prompt + edited[:3]], [SamplingParams(max_new_tokens=7)])
    expected = tiny.tokenizer.decode(edited[:3] + list(again.token_ids), skip_special_tokens=True)
    assert rewrite.rewritten(generator, prompt, initial, edited, 10, ()) == expected
    assert rewrite.rewritten(generator, prompt, initial, initial, 10, ()) is None  # nothing changed
    assert rewrite.rewritten(generator, prompt, initial, [*initial[:-1], 3012], 10, ()) is None  # at the end

    rows = {r["condition"]: r for r in rewrite.run(tiny, load_concept_sets(3), max_new_tokens=8)}
    assert list(rows) == list(rewrite.CONDITIONS)
    step, kept = rows["greedy + step"], rows["rewrite if it keeps coverage"]
    assert step["coverage"] >= rows["greedy"]["coverage"] and kept["coverage"] >= step["coverage"]
    assert all(r["prompts"] == 3 and math.isfinite(r["own_ppl_change_pct"]) for r in rows.values())
    assert rows["rewrite after the last edit"]["seconds_per_generation"] >= step["seconds_per_generation"] > 0
    assert "rewrite after the last edit" in markdown_table(list(rows.values()), rewrite.TABLE)


def test_http_quality_reads_everything_from_the_servers_answers(tiny):
    from benchmarks import http_quality

    items = load_concept_sets(2)
    server = start_server(tiny)
    try:
        result = http_quality.run(server.url, items, tiny.tokenizer, max_new_tokens=5)
    finally:
        server.stop()
    summary = result["summary"]
    assert summary["prompts"] == 2 and summary["objective_decreased_frac"] == 0.0
    assert summary["generate_s_mean"] > 0 and summary["time_ratio_of_sums"] > 0
    for record, item in zip(result["records"], items):
        assert record["index"] == item.index and 1 <= record["tokens"] <= 5
        assert record["objective_after"] >= record["objective_before"]
    assert "refine/gen" in markdown_table([summary], http_quality.TABLE)


def test_reference_run_measures_distance_and_judge_on_every_condition(tiny, tiny_judge):
    items = load_concept_sets(2)
    assert all(item.references for item in items)  # CommonGen's human sentences
    result = reference.run(tiny, Refiner(tiny), tiny_judge.perplexity, items, weights=[4.0])
    names = [row["condition"] for row in result["summary"]]
    assert names == ["+ reference (w=4)", reference.ALONE]
    for row in result["summary"]:
        assert row["prompts"] == 2 and row["objective_down_frac"] == 0.0
        assert row["closer_frac"] + row["farther_frac"] <= 1.0 and row["ppl_ratio"] > 0
    assert reference.distance("A dog runs.", "A dog runs.") == 0.0
    assert reference.distance("A cat runs.", "A dog runs .") == 0.25
    assert "+ reference alone" in markdown_table(result["summary"], reference.TABLE)


def test_slices_are_disjoint_and_the_held_out_one_is_the_end_of_the_file():
    assert not set(SLICES["tuning"]) & set(SLICES["held-out"])
    held_out = load_slice("held-out", 3)
    assert [i.index for i in held_out] == [793, 794, 795]
    low, high = bootstrap_interval([1.0, 2.0, 3.0, 4.0], lambda xs: float(xs.mean()))
    assert 1.0 <= low <= 2.5 <= high <= 4.0


def test_generation_variants_compare_ours_with_model_generate_on_packed_and_plain_weights(tokenizer):
    packed, plain = (tiny_llama(tokenizer, seed=0, pack_weights=pack) for pack in (True, False))
    prompts = [tokenizer.encode("a cat")[:3], tokenizer.encode("the dog runs")[:4]]
    rows = speed.run_generation_variants(packed, prompts, 5, plain, compile_model=False, rounds=1)
    assert [r["variant"] for r in rows] == [
        "BatchGenerator (ours)",
        "model.generate",
        "BatchGenerator, plain weights",
        "model.generate, plain weights",
        "model.generate, static cache",
        "BatchGenerator (ours), 2 prompts in one batch",
        "model.generate, 2 prompts in one batch",
    ]
    assert all(r["same_tokens_as_ours"] and r["tokens"] == 10 for r in rows)
    assert markdown_table(rows, speed.GENERATION_TABLE).count("\n") == len(rows) + 1
