#!/usr/bin/env bash
# The GPU measurements of issue #13 on one H100/H200, within 8 minutes:
#   1. Llama-3.2-1B shape (random weights), bf16 compute over float32 weights, 8 pairs of
#      128 + 384 tokens: TRL 1.16's DPOTrainer, midpo's DPO step and its TDPO step
#      (a token-level prior against DPO);
#   2. the same model, 16 pairs of 256 + 768 tokens: TRL and midpo.
# Each line of OUT/gpu_suite.jsonl is one worker's result or a summary (tokens/s, peak device
# memory, utilisation against the 989 TFLOP/s bf16 datasheet peak, ratios to TRL); the log
# is OUT/gpu_suite.log. Figures go to BENCHMARKS.md with the date, the card and the versions
# the JSON lines name.
#
#   bash benchmarks/gpu_suite.sh [OUT]            # from the repository root (--help: this)
#
# What it needs beyond a CUDA build of jax and torch (a GPU image has them; the script never
# installs either): trl, datasets and midpo's own dependencies that are not there. midpo itself
# runs from this checkout (PYTHONPATH), not installed: its pinned jax is the CPU build, and
# would replace the GPU one. Missing packages go to /tmp/midpo_site (pip --target: no change to
# the image's environment, PEP 668 or not), at the versions setup.py pins where it pins them,
# with the installed jax, torch and nvidia-* versions held fixed (a pip constraints file), from
# the package index, or with MIDPO_WHEELS=DIR from the wheels in DIR alone (a machine with no
# network: fill DIR elsewhere with `pip download --no-deps --only-binary=:all:
# --python-version X.Y ...`, X.Y the GPU machine's Python, of the packages this script names
# as missing and of their own missing dependencies).
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/gpu_suite_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_suite.log"
JSONL="$OUT/gpu_suite.jsonl"
: > "$JSONL"
PY="${PYTHON:-python3}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_suite: no NVIDIA GPU here (nvidia-smi -L failed); nothing measured." >&2
  exit 2
fi
nvidia-smi -L | tee "$LOG"

# jax (with a GPU) and torch must be there already: a pip install would fetch CPU builds.
"$PY" -c "import jax, torch" 2>&1 | tee -a "$LOG"

# module name -> pip requirement (the versions setup.py pins; datasets and accelerate are
# TRL's own requirements, at whatever version pip picks). flax 0.12.8, setup.py's pin, does not
# import under jax 0.11 (jax.experimental.hijax changed): with jax 0.11 or newer, flax 0.12.12,
# which passed midpo's model, generation, fused-head, packing, golden-step, padding-free and
# every-config tests under jax 0.11.2 on Python 3.12 (CPU). The packages built on jax are
# imported, not only found: one that an image has but that fails with its jax is installed
# again, into /tmp/midpo_site, which comes first on the path.
missing=$("$PY" - <<'EOF'
import importlib, importlib.metadata, importlib.util
jax_minor = tuple(int(x) for x in importlib.metadata.version("jax").split(".")[:2])
need = {"trl": "trl==1.16.0", "datasets": "datasets", "accelerate": "accelerate",
        "ml_collections": "ml_collections==1.1.0",
        "tensorflow_datasets": "tensorflow-datasets==4.9.10",
        "array_record": "array_record==0.8.6", "tensorboardX": "tensorboardX==2.6.5",
        "importlib_resources": "importlib_resources==7.1.0", "safetensors": "safetensors==0.8.0",
        "tokenizers": "tokenizers==0.23.3", "transformers": "transformers==5.24.0",
        "flax.nnx": "flax==0.12.12" if jax_minor >= (0, 11) else "flax==0.12.8",
        "optax": "optax==0.2.8",
        "orbax.checkpoint": "orbax-checkpoint==0.12.8", "chex": "chex==0.1.92",
        "absl": "absl-py==2.5.1", "pandas": "pandas==3.1.1", "jinja2": "Jinja2==3.1.6"}
ON_JAX = ("flax.nnx", "optax", "orbax.checkpoint", "chex")
def there(module):
  try:
    if module in ON_JAX:
      importlib.import_module(module)
      return True
    return importlib.util.find_spec(module) is not None
  except Exception:  # not there, or there but broken under this jax
    return False
print(" ".join(req for mod, req in need.items() if not there(mod)))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_suite: installing $missing into /tmp/midpo_site" | tee -a "$LOG"
  "$PY" -m pip freeze 2>/dev/null \
    | grep -Ei '^(jax|jaxlib|jax-cuda[0-9a-z-]*|torch|nvidia-[a-z0-9-]*)==' \
    > /tmp/midpo_constraints.txt || true
  if [ -n "${MIDPO_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/midpo_site \
      "$MIDPO_WHEELS"/*.whl 2>&1 | tee -a "$LOG"
  else
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --target /tmp/midpo_site -c /tmp/midpo_constraints.txt $missing \
      2>&1 | tee -a "$LOG"
  fi
  export PYTHONPATH="$PYTHONPATH:/tmp/midpo_site"
fi
"$PY" -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('jax', jax.__version__, d)" \
  2>&1 | tee -a "$LOG"

# One call of benchmarks/vs_trl.py; a stuck one ends at its time limit and the suite goes on.
bench() {
  local limit=$1; shift
  echo "== $(date -u +%FT%TZ) vs_trl.py $*" | tee -a "$LOG"
  timeout -k 15 "$limit" "$PY" benchmarks/vs_trl.py --device gpu --shape llama3.2-1b \
    --dtype bfloat16 --warmup 3 --steps 10 --repeats 1 --assets_dir /tmp/midpo_gpu_assets \
    --out "$JSONL" "$@" 2>&1 | tee -a "$LOG" || echo "gpu_suite: this call failed or timed out" \
    | tee -a "$LOG"
}

bench 270 --pairs 8 --prompt_len 128 --response_len 384 \
  --midpo_variant prior.name=tdpo,prior.kl_coef=0.5
bench 170 --pairs 16 --prompt_len 256 --response_len 768

echo "gpu_suite: $(( $(date +%s) - start )) s; results in $JSONL" | tee -a "$LOG"
