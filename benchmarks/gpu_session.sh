#!/usr/bin/env bash
# One device call: what jpeft measures on a lent GPU (see docs/BENCHMARKS.md "On a GPU").
# Runs from the repository root on the device machine, where the image's python3 holds JAX (CUDA),
# flax, optax, orbax, torch, transformers and peft; google-re2 travels as a wheel in .whl/.
# Usage there: bash benchmarks/gpu_session.sh [parts...]   (parts: env attention accel quant serve)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=$PWD
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
    attention) timeout 200 python3 benchmarks/gpu_attention.py --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" ;;
    accel) timeout 330 python3 benchmarks/accelerator.py --size 1b --steps 10 --json "$OUT/accel.json" 2>&1 | tee "$OUT/accel.log" ;;
    quant) timeout 270 python3 benchmarks/bench_quant.py --size 1b --steps 40 --json "$OUT/quant.json" 2>&1 | tee "$OUT/quant.log" ;;
    serve) timeout 170 python3 benchmarks/bench_serve.py --hidden 2048 --intermediate 5632 --layers 22 --heads 32 \
             --vocab 32000 --rank 16 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
             --adapters 1,64 --requests 128 --slots 32 --prompt 128 --new-tokens 64 --chunk 128 --repeats 2 \
             --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" ;;
  esac
done
echo "=== done ($(date -u +%T))"
