#!/usr/bin/env bash
# The speed benchmark on one CUDA GPU with random-weight Llama 3 models (bf16), as measured on the
# lent H100/H200 machine: nothing can be downloaded there, so the Python packages that differ from the
# machine's (carried as wheels in .gpu/whl), the embedded tokenizer (.gpu/tokenizer) and the CommonGen
# file (.gpu/data) travel with the working tree; `make gpu-bundle` fills .gpu. Results go to $OUT.
# Each part has its own time limit, so one slow part still leaves the others their turn.
#
#   bash benchmarks/gpu.sh bundle    # here: fill .gpu (make gpu-bundle)
#   bash benchmarks/gpu.sh [PART...] # there: install the wheels under /tmp/site, run the parts
#                                    # (test llama-1b server throughput throughput-16 profile llama-8b;
#                                    # default: all but throughput-16 and profile, in that order)
set -u
if [ "${1:-}" = bundle ]; then
    # The versions this project's venv holds, as Python 3.12 wheels (the GPU image's Python).
    packages=$(.venv/bin/pip freeze | grep -iE '^(transformers|tokenizers|huggingface.hub|hf.xet|fastapi|starlette|pydantic|pydantic.core|pydantic.settings|python.dotenv|annotated.types|annotated.doc|typing.inspection|typing.extensions|opentelemetry.api|importlib.metadata|uvicorn|anyio|sniffio|h11|httpx|httpcore)==')
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/tokenizer .gpu/data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl $packages || exit 1
    tokenizer=$(.venv/bin/python -c "from refiners.models import model_path; print(model_path())")
    cp "$tokenizer"/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,chat_template.jinja} .gpu/tokenizer/
    cp "$(.venv/bin/python -c "from benchmarks.commongen import default_data_path; print(default_data_path())")" .gpu/data/
    du -sh .gpu
    exit 0
fi
OUT=${OUT:-benchmarks/results}
exec > >(tee "$OUT/gpu-run.log") 2>&1
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[ -f .gpu/data/dev.jsonl ] && export REFINER_COMMONGEN_PATH=$PWD/.gpu/data/dev.jsonl
tok=(); [ -d .gpu/tokenizer ] && tok=(--tokenizer .gpu/tokenizer)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

parts=${*:-test llama-1b server throughput llama-8b}
want() { [[ " $parts " == *" $1 "* ]]; }

# The library on CUDA first (bf16, every method and term, tiny models): a failure here explains the rest.
want test && { REFINER_TEST_TOKENIZER=${tok[1]:-} timeout 60 python3 -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py || echo "!! tests/test_cuda.py ended with $?"; }

speed() { # arch, seconds, then speed.py arguments
    local arch=$1 limit=$2; shift 2
    timeout --signal=INT "$limit" python3 -m benchmarks.speed --arch "$arch" --device cuda "${tok[@]}" \
        --out "$OUT/speed-$arch-cuda.json" "$@" || echo "!! $arch $* ended with $?"
}
want llama-1b && speed llama-1b 100 --part latency --lengths 16 32 64 --requests 4
# The step through the HTTP server, and the same prompts in process in turn (same JSON, "server").
want server && speed llama-1b 110 --part server --lengths 16 32 64 --requests 4
want throughput && speed llama-1b 170 --part throughput --batch-sizes 1 16 --max-requests-per-level 32
# 16 clients with 64 requests each way (the full part sends 32 at that level, two rounds).
want throughput-16 && speed llama-1b 200 --part throughput --batch-sizes 1 16 --concurrency 16 \
    --requests-per-level 64
# Where the step's launches go, by part: model forwards, the backward, the refiner's own.
want profile && { timeout 120 python3 -m benchmarks.step_profile --arch llama-1b --device cuda "${tok[@]}" \
    --length 64 --out "$OUT/step-profile-llama-1b-cuda.json" || echo "!! profile ended with $?"; }
want llama-8b && speed llama-8b 100 --part latency --lengths 16 32 64 --requests 4 --methods coordinate
exit 0  # each part reports its own failure above ("!! ...")
