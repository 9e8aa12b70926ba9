#!/usr/bin/env bash
# `make gpu-check`: every GPU test and benchmark in one command, on a GPU host's own python3 (jax preinstalled,
# no network, no venv). Pure-Python wheels the host lacks come from .whl/ (`make gpu-wheels` fetches them).
# Prints a short table at the end; logs and JSON go to $OUT (default .work/gpu-check).
# Parts: `tools/gpu_check.sh [dmc] [sdc]` (default both). Together they can exceed a 10-minute call on a fresh
# machine (Triton compiles); run `dmc` and `sdc` as two calls on the same warm machine if so.
set -uo pipefail
PARTS=" ${*:-dmc sdc} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-.work/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dmc-jax-site .whl/*.whl \
    || { echo "gpu-check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/dmc-jax-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export DMC_JAX_ALLOW_MISSING_ASSETS=1  # the 98 MB SmolLM2 GGUF package is not carried to GPU hosts
status=0
$PY - <<'PY' | tee "$OUT/env.txt"
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "devices", jax.devices())
assert jax.devices()[0].platform == "gpu", "gpu-check: no GPU visible to JAX"
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

if want dmc; then
# 1. Tests on the GPU. float32 goldens (1e-4) need true float32 matmuls, not TF32.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 $PY -m pytest -q -p no:cacheprovider -m "not slow" \
  tests/dmc_jax/test_golden_hf.py tests/dmc_jax/convert/test_meta.py tests/dmc_jax/test_dmc_equivalence.py tests/dmc_jax/test_cache.py 2>&1 \
  | tee "$OUT/pytest.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# 1b. The Pallas kernels natively (Triton): the CPU suites (here "pallas" compiles for the GPU) + the gpu-marked tests.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 $PY -m pytest -q -p no:cacheprovider \
  tests/pallas_kernels/test_dmc_decode.py tests/pallas_kernels/test_dmc_attention.py 2>&1 | tee "$OUT/pytest_kernels.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# 2. Decode throughput with random weights, bf16 (speed does not depend on the values), prefill included: the
#    vanilla cache and the DMC cache (Pallas decode kernel) with decisions forced to CR 4, at the same batch.
timeout 200 $PY -m experiments.bench.decode --model llama2-7b --batch 32 --prompt-len 512 --new-tokens 64 \
  --dtype bfloat16 --repeats 1 --dmc-cr 4 --json "$OUT/bench_llama2_7b.json" > "$OUT/bench_llama2_7b.md" \
  2> "$OUT/bench_7b.err" || { status=1; tail -5 "$OUT/bench_7b.err"; }

# 3. `dmc-jax bench --preset gpu`: Llama-2-7B shape, DMC (Pallas decode kernel) vs vanilla at an equal 30 GiB KV
#    budget with analytic batches, CR 2/4/8; decode-kernel bandwidth vs copy bandwidth; train step fused vs dense.
#    (Untraced, so that the timings carry no tracing overhead; 3b writes the traces.)
timeout 300 $PY -m experiments.cli.dmc bench --preset gpu --json "$OUT/bench_dmc.json" \
  > "$OUT/bench_dmc.md" 2> "$OUT/bench_dmc.err" || { status=1; tail -5 "$OUT/bench_dmc.err"; }

# 3b. Traces of the Llama-2-7B shape (docs/profiling.md): DMC decode steps 3-5 (whole model, bf16, CR 4, the batch
#     of an 8 GiB KV budget at 1024 tokens) and retrofit steps 3-5 (2 layers, 1 × 4096, stage 2). Separate from
#     the timed runs above; written beside their JSON: $OUT/profile/{decode,retrofit}/plugins/profile/<run>/,
#     step times and trace paths in $OUT/profile_steps.json. View: xprof --logdir $OUT/profile/decode.
timeout 240 $PY -m experiments.bench.profile_steps --out "$OUT/profile" --json "$OUT/profile_steps.json" \
  > "$OUT/profile_steps.log" 2> "$OUT/profile_steps.err" || { status=1; tail -5 "$OUT/profile_steps.err"; }

fi

if want sdc; then
# 4. SDC op: the shared suite (native fused kernel vs the reference, forward and backward), then the fused kernel
#    vs both XLA formulations (time, compiled peak memory, bandwidth vs copy), then SDC-Net predicted frames/s at
#    720p and 1080p — separate runs, so a timeout in one keeps the others' results.
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/pallas_kernels/test_displaced_conv.py 2>&1 \
  | tee "$OUT/pytest_sdc.log" | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 150 $PY -m experiments.bench.sdc --sizes 256,720p,1080p --ns 1,5,11 --model-sizes "" --min-seconds 0.2 \
  --json "$OUT/bench_sdc.json" > "$OUT/bench_sdc.md" 2> "$OUT/bench_sdc.err" \
  || { status=1; tail -5 "$OUT/bench_sdc.err"; }
timeout 120 $PY -m experiments.bench.sdc --sizes "" --model-sizes 720p,1080p --min-seconds 0.5 \
  --json "$OUT/bench_sdc_model.json" > "$OUT/bench_sdc_model.md" 2> "$OUT/bench_sdc_model.err" \
  || { status=1; tail -5 "$OUT/bench_sdc_model.err"; }
fi

echo
echo "== gpu-check summary =="
grep -hE "passed|failed|error" "$OUT/pytest.log" 2>/dev/null | tail -1
grep -hE "passed|failed|error" "$OUT/pytest_kernels.log" 2>/dev/null | tail -1
cat "$OUT/bench_llama2_7b.md" 2>/dev/null
echo
cat "$OUT/bench_dmc.md" 2>/dev/null
grep -h '"trace"' "$OUT/profile_steps.json" 2>/dev/null
grep -hE "passed|failed|error" "$OUT/pytest_sdc.log" 2>/dev/null | tail -1
echo
cat "$OUT/bench_sdc.md" "$OUT/bench_sdc_model.md" 2>/dev/null
exit $status
