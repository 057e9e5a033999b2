#!/usr/bin/env bash
# The GPU check (docs/benchmarks/gpu-h200.md), run on the GPU machine in the repo root with
# .whl/ and .devcache/ from scripts/gpu_prepare.sh beside it; results go to $OUT.
#   tests    the tiny-model tests (runner, blend, Cake, tune, errors, server) on cuda
#   prefill  our prefill against the HF forward, random-weight llama3-8b
#   blend    blend TTFT with random-weight qwen2.5-0.5b and -7b shapes, 2 and 8 load streams
#   blend7b  the same for the 7b shape only
#   all      all of the above (the default)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KVCAKE_CACHE_DIR=/tmp/kvc
mkdir -p /tmp/kvc/data && gunzip -c .devcache/disfl_qa_test.jsonl.gz > /tmp/kvc/data/disfl_qa_test.jsonl && cp .devcache/paul_graham_essays.json /tmp/kvc/data/
nvidia-smi -L; python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())'
step=${1:-all}
if [[ $step == all || $step == tests ]]; then
  KVCAKE_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider -m "not real_model" \
    tests/test_runner.py tests/test_blend.py tests/test_cake.py tests/test_tune.py tests/test_errors.py tests/test_server.py 2>&1 | tee "$OUT/tests-cuda.log" | tail -40
fi
if [[ $step == all || $step == prefill ]]; then
  timeout 150 python3 -m kvcake.cli bench prefill --shape llama3-8b --lengths 1024,4096,16384 --repeats 3 --out "$OUT/prefill-gpu.md" 2>&1 | grep -v Warn | tail -8
fi
shapes="qwen2.5-0.5b qwen2.5-7b"
[[ $step == blend7b ]] && shapes=qwen2.5-7b
if [[ $step == all || $step == blend || $step == blend7b ]]; then
  for shape in $shapes; do
    timeout 100 python3 scripts/random_model.py .devcache/qwen-tok "/tmp/rand-$shape" "$shape" 2>&1 | tail -1
    for streams in 2 8; do
      KVCAKE_LOAD_STREAMS=$streams timeout 120 python3 -m kvcake.cli bench blend --model "/tmp/rand-$shape" --factors 1 --repeats 3 --out-dir /tmp/b 2>&1 | grep -v Warn | tail -3
      cp /tmp/b/blend-ttft.md "$OUT/blend-$shape-streams$streams.md"
      tail -5 /tmp/b/blend-ttft.md
    done
  done
fi
