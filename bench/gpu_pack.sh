#!/usr/bin/env bash
# Run on the development machine before a GPU session. Packs everything the GPU image lacks so that ONE run
# carrying .gpu/base works on a bare machine (a machine goes back 30 s after a call, so multi-run staging breaks
# whenever calls are slower than that):
#   .gpu/base/site.tar.xz   all wheels unpacked and xz-compressed (~25 MB instead of ~75 MB of zips)
#   .gpu/base/jit.tgz       FlashInfer's JIT cache (bf16 decode/prefill, head dims 64/128), or jit.tar.xz: the cache
#                           a GPU run saved with the `jit` stage of bench/gpu_check.sh (adds the kernels built there,
#                           e.g. the tensor-core decode's), recompressed into .gpu/jit-cache.tar.xz
#                           (`bash bench/gpu_pack.sh --jit PATH/jit-new.tgz` makes it)
#   .gpu/model1..3          thirds of the default model's GGUF (98 MB): each fits beside base in one run, so
#                           three back-to-back runs, each also carrying base, assemble it while doing other work
# bench/gpu_check.sh unpacks whatever of these it finds. Uses the shared pack (../shared/gpu/pack.sh) for downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--jit" ]; then
  tmp=$(mktemp -d); tar -C "$tmp" -xzf "$2"; tar -C "$tmp" -c flashinfer | xz -9 -T0 > .gpu/jit-cache.tar.xz
  rm -rf "$tmp"; ls -la .gpu/jit-cache.tar.xz; exit 0
fi
shared=$(cd ../shared/gpu && pwd)
[ -d .gpu/p01 ] || bash "$shared/pack.sh" --with-model
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cat .gpu/p0*/chunk.* | tar -C "$work" -x
pip download -q --no-deps -d "$work/wheels" opentelemetry-api importlib-metadata zipp
rm -rf .gpu/model*; mkdir -p "$work/site" .gpu/base .gpu/model1 .gpu/model2 .gpu/model3
for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/site/"; done
# Old, fixed mtimes: FlashInfer runs ninja before loading a JIT module; headers unpacked "now" must never look newer
# than the staged .so files (built earlier), or a fresh machine could rebuild modules for minutes (a suspect for the
# ~100 s a first start spent outside the compile cache, docs/PERF.md; not confirmed).
tar -C "$work/site" --mtime="2000-01-01 00:00:00" -c . | xz -T0 -6 > .gpu/base/site.tar.xz
rm -f .gpu/base/jit.tgz .gpu/base/jit.tar.xz
if [ -f .gpu/jit-cache.tar.xz ]; then cp .gpu/jit-cache.tar.xz .gpu/base/jit.tar.xz
else cp "$work"/flashinfer-*-jit-cache-*.tgz .gpu/base/jit.tgz; fi
gguf=$(ls "$work"/model/*.gguf)
split -n 3 -d -a 1 "$gguf" "$work/part."
for i in 1 2 3; do mv "$work/part.$((i - 1))" .gpu/model$i/; basename "$gguf" > .gpu/model$i/NAME; done
du -sh .gpu/base .gpu/model*
