#!/usr/bin/env bash
# Run on the development machine before a GPU session: downloads wheels the shared GPU pack lacks into .gpu/extra
# (git-ignored; name it in `run`'s carry list). The staged fastapi imports opentelemetry, so `vllm-lite serve`
# fails there without them. bench/gpu_check.sh installs whatever it finds in .gpu/extra.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/extra
pip download -q --no-deps -d .gpu/extra opentelemetry-api importlib-metadata zipp
ls .gpu/extra
