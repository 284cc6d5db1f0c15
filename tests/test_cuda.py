"""The library on a CUDA device in bf16: generation and every method and term on tiny random models.

CI has no GPU, so this module is skipped there; ``benchmarks/gpu.sh`` runs it first on a GPU machine.
It catches what a CPU run cannot: a CPU tensor meeting a CUDA one, and bf16 meeting float32.
"""

from __future__ import annotations

import pytest
import torch

from refiners import METHODS, RefineConfig, Refiner, RefineRequest, prepare_model
from refiners.generation import BatchGenerator, SamplingParams
from tests.tiny_models import ARCHITECTURES, chat_prompt, embedded_tokenizer, output_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {
    **{m: RefineConfig(method=m, keywords=("dog", "ball"), steps=2, candidates=8) for m in METHODS},
    # Every weighted term estimates a float: the gain must still land on the GPU.
    "no-logprob": RefineConfig(keywords=("dog",), target_length=10, weights={"logprob": 0.0, "fluency": 0.0}),
    "gradient-length-only": RefineConfig(
        method="gradient", weights={"logprob": 0.0, "fluency": 0.0}, target_length=5
    ),
    "reference-avoid": RefineConfig(
        method="hybrid", reference="A dog plays with a ball.", avoid=("cat",), candidates=8
    ),
    "prompt-coverage": RefineConfig(
        keywords=("dog",), weights={"prompt_coverage": 1.0}, candidates=8, steps=2
    ),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def on_cuda(request):
    tokenizer = embedded_tokenizer()
    base = ARCHITECTURES[request.param](tokenizer)
    return prepare_model(base.model.to(torch.bfloat16), tokenizer, base.model_id, device="cuda")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_and_term_refines_on_cuda(on_cuda, name):
    tokenizer, config = on_cuda.tokenizer, CONFIGS[name]
    prompts = [chat_prompt(tokenizer, t) for t in ("Write a sentence about a dog and a ball.", "Hi.")]
    sampled = SamplingParams(8, do_sample=True, seed=1, top_k=50, top_p=0.9, repetition_penalty=1.2)
    [out] = BatchGenerator(on_cuda).generate(prompts[:1], [sampled], keep_prompt_cache=True)
    fixed = output_ids(tokenizer, "The cat sat on the mat near the house.")
    refiner = Refiner(on_cuda, scoring_chunk_size=8)
    results = refiner.refine(
        [
            RefineRequest(prompts[0], list(out.token_ids), config, out.prompt_cache),
            RefineRequest(prompts[1], fixed, config),
        ]
    )
    for result in results:  # the step keeps a change only when it raises the objective
        assert result.objective_after["total"] >= result.objective_before["total"] - 1e-3
    scores = refiner.score(prompts[0], [fixed, list(out.token_ids)], config)
    assert len(scores) == 2


def test_passes_on_a_gpu_are_large_and_few(on_cuda):
    runner = Refiner(on_cuda).runner
    memory = torch.cuda.get_device_properties(runner.device).total_memory
    assert (runner.chunk_size, runner.pass_bytes, runner.pass_overhead) == (1024, memory // 16, 512.0)
