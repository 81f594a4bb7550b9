#!/usr/bin/env bash
# Stage GSM8K for device runs inside the default model's second part, .gpu/model2/gsm8k/ (it leaves ~1 MB of the
# 64 MiB a call may carry): test.jsonl.xz, and train.jsonl.xz with the first 20 rows whole (the evals' few-shot
# examples) and only the question of every other row (all that train-draft reads). bench/gpu_check.sh unpacks it into
# shared/data/gsm8k on the device, so the call that carries .gpu/model2 has the data and nothing has to be staged
# between two back-to-back calls (a machine left idle for 30 s is given back).
#   bash bench/gpu_shared.sh [SOURCE_FOLDER]   (default ../shared/data/gsm8k)
set -euo pipefail
src=${1:-../shared/data/gsm8k}
dst=.gpu/model2/gsm8k
mkdir -p "$dst"
xz -9 -c "$src/test.jsonl" > "$dst/test.jsonl.xz"
python3 - "$src/train.jsonl" <<'PY' | xz -9 > "$dst/train.jsonl.xz"
import json, sys
for i, line in enumerate(open(sys.argv[1])):
    row = json.loads(line)
    print(json.dumps(row if i < 20 else {"question": row["question"]}))
PY
du -cb "$dst"/*.xz | tail -1
