#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, the core suites with a GPU present (device="auto" then means
# cuda), and the GPU benchmark. Results go to ${OUT:-gpu_results}/. The app and browser suites are not run here
# (they need streamlit and chromium, and never touch the GPU unless the user picks it).
#   bash scripts/gpu_check.sh            # tests + benchmark (about 10 minutes on an H100)
#   bash scripts/gpu_check.sh tests      # tests only
#   bash scripts/gpu_check.sh bench      # benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
what="${1:-all}"
export PYTHONUNBUFFERED=1 KERAS_BACKEND=torch
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"

if [ "$what" != "bench" ]; then
  core="tests/test_cuda.py tests/test_engine.py tests/test_scale.py tests/test_longseq.py tests/test_masks.py
        tests/test_pooling.py tests/test_parity_torch.py tests/test_parity_sdpa.py tests/test_parity_keras.py
        tests/test_figures.py tests/test_fuzz_engine.py tests/test_masklab.py tests/test_urlstate.py"
  # shellcheck disable=SC2086
  python3 -m pytest $core -q -p no:cacheprovider --durations=10 2>&1 | tee "$out/tests.log" | tail -25
fi
if [ "$what" != "tests" ]; then
  for dtype in float32 bfloat16; do
    python3 scripts/benchmark.py --device cuda --dtype "$dtype" --json "$out/bench_cuda_$dtype.json" \
      2>&1 | tee "$out/bench_cuda_$dtype.md" | tail -60
  done
fi
