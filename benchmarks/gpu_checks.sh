#!/usr/bin/env bash
# Issue 7's GPU checks in one command, for a machine with one H100/H200 (about 15 minutes):
#   bash benchmarks/gpu_checks.sh            # every check; each benchmark appends to benchmarks/RESULTS.md
#   bash benchmarks/gpu_checks.sh tests      # only the GPU-marked tests
#   bash benchmarks/gpu_checks.sh bench      # only the benchmarks
#   bash benchmarks/gpu_checks.sh compare    # issue 14: kit vs upstream, < 8 min (UPSTREAM=path of a
#                                            # hustvl/LightningDiT checkout, default .upstream/LightningDiT;
#                                            # it needs timm, einops and upstream's fairscale wheel)
# A failing check does not stop the others; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
what="${1:-all}"
failed=0
check() { echo "== $*"; "$@" || { echo "!! failed: $*"; failed=1; }; }

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2
if [[ "$what" == all || "$what" == compare ]]; then
  check python benchmarks/compare_upstream.py --upstream "${UPSTREAM:-.upstream/LightningDiT}" --budget 400
fi
if [[ "$what" == all || "$what" == tests ]]; then
  check python -m pytest -q -m gpu tests/test_gpu.py tests/test_training.py tests/test_inference.py
fi
if [[ "$what" == all || "$what" == bench ]]; then
  # sampling: >= 45% MFU in bf16 at batch >= 64, and the ratio/max difference against the plain fp32 path
  check python benchmarks/bench_sampling.py --model LightningDiT-XL/1 --batch 64 --steps 250 --repeats 1 --compare-plain
  check python benchmarks/bench_sampling.py --model LightningDiT-XL/1 --batch 128 --steps 250 --repeats 1 --compile reduce-overhead
  # training: >= 40% MFU in bf16; then the T4 settings (fp16 + scaler + checkpointing, micro-batch 8): peak <= 15 GB
  check python benchmarks/bench_train.py --model LightningDiT-XL/1 --micro-batch 64 --precision bf16 --checkpointing off --no-t4-row
  check python benchmarks/bench_train.py --model LightningDiT-XL/1 --micro-batch 8 --precision fp16 --checkpointing on --no-t4-row
  # VFM-VAE (random weights, needs transformers): official f16d32 images/s and max_memory_allocated against the
  # computed budget, fp32 and with the loader's half-precision options
  check python benchmarks/bench_vfm_vae.py --configs official --batch 32 --no-budget
  check python benchmarks/bench_vfm_vae.py --configs official --batch 32 --num-fp16-res 3 --siglip-precision bf16 --no-budget
fi
exit $failed
