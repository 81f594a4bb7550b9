#!/usr/bin/env bash
# Stage GSM8K for device runs beside the default model's second part (.gpu/model2 leaves ~1 MB of the 64 MiB a call
# may carry): shared/data/gsm8k/test.jsonl.xz, and train.jsonl.xz with the first 20 rows whole (the evals' few-shot
# examples) and only the question of every other row (all that train-draft reads). shared/ is in .git/info/exclude;
# the device command unpacks with `xz -dk shared/data/gsm8k/*.xz`. Remove shared/ before running the CPU tests.
#   bash bench/gpu_shared.sh [SOURCE_FOLDER]   (default ../shared/data/gsm8k)
set -euo pipefail
src=${1:-../shared/data/gsm8k}
grep -qx "/shared/" .git/info/exclude 2>/dev/null || echo "/shared/" >> .git/info/exclude
mkdir -p shared/data/gsm8k
xz -9 -c "$src/test.jsonl" > shared/data/gsm8k/test.jsonl.xz
python3 - "$src/train.jsonl" <<'PY' | xz -9 > shared/data/gsm8k/train.jsonl.xz
import json, sys
for i, line in enumerate(open(sys.argv[1])):
    row = json.loads(line)
    print(json.dumps(row if i < 20 else {"question": row["question"]}))
PY
du -cb shared/data/gsm8k/*.xz | tail -1
