#!/usr/bin/env bash
# One device call: what jpeft measures on a lent GPU (see docs/BENCHMARKS.md "On a GPU").
# Runs from the repository root on the device machine, where the image's python3 holds JAX (CUDA),
# flax, optax, orbax, torch, transformers and peft; google-re2 travels as a wheel in .whl/.
# Usage there: bash benchmarks/gpu_session.sh [parts...]
#   parts: env smoke attention accel pair seq4096 seq256 quant serve
#   smoke stops the whole session when jpeft cannot train a toy model there (device time is scarce)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=$PWD
# a later process of the same shape loads its compiled step instead of compiling it again
# (first_step_s then says so); step times are unchanged
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
parts=${*:-env attention accel}
for part in $parts; do
  echo "=== $part ($(date -u +%T))"
  case $part in
    env) nvidia-smi -L; python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers, peft; \
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, \
'| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" ;;
    smoke) nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
           timeout 120 python3 benchmarks/accelerator.py --size toy --steps 2 --runs jpeft-lora 2>&1 | tee "$OUT/smoke.log"
           grep -q "jpeft-lora (round 1) on" "$OUT/smoke.log" || { echo "smoke failed: stopping"; exit 1; } ;;
    attention) timeout 200 python3 benchmarks/gpu_attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" ;;
    accel) timeout 330 python3 benchmarks/accelerator.py --size 1b --steps 10 --json "$OUT/accel.json" 2>&1 | tee "$OUT/accel.log" ;;
    pair) timeout 300 python3 benchmarks/accelerator.py --size 1b --steps 10 --runs jpeft-lora,peft-lora --rounds 2 \
            --json "$OUT/pair.json" 2>&1 | tee "$OUT/pair.log" ;;
    seq4096) timeout 200 python3 benchmarks/accelerator.py --size 1b --steps 10 --runs jpeft-lora,peft-lora --seq 4096 \
            --batch 2 --json "$OUT/seq4096.json" 2>&1 | tee "$OUT/seq4096.log" ;;
    seq256) timeout 200 python3 benchmarks/accelerator.py --size 1b --steps 10 --runs jpeft-lora,peft-lora --seq 256 \
            --batch 32 --json "$OUT/seq256.json" 2>&1 | tee "$OUT/seq256.log" ;;
    quant) timeout 270 python3 benchmarks/bench_quant.py --size 1b --steps 40 --json "$OUT/quant.json" 2>&1 | tee "$OUT/quant.log" ;;
    serve) timeout 170 python3 benchmarks/bench_serve.py --hidden 2048 --intermediate 5632 --layers 22 --heads 32 \
             --vocab 32000 --rank 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
             --adapters 1,64 --requests 128 --slots 32 --prompt 128 --new-tokens 64 --chunk 128 --repeats 2 \
             --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" ;;
  esac
done
echo "=== done ($(date -u +%T))"
