#!/usr/bin/env bash
# One GPU session's benchmarks, every JSON into one folder (issue 12).
#
# Runs, in this order (STEPS), on one CUDA machine:
#   e2e: bench/e2e.py --case gpu: one `flowerml retrain` of the default recipe (ResNet-152,
#        224 px, its full 30-epoch schedule, --weights none: the machine reaches no download) at
#        real scale (8,189 images of ~500 px, 1,020 / 1,020 / 6,149), trigger to decision, stage
#        by stage, with its chart. The export stage is timed in three parts (the JSON's "onnx
#        export", "parity", "int8 (quantise and gate)"): parity runs ONNX Runtime alone over the
#        whole test split against the evaluation's stored logits, on CUDA where onnxruntime-gpu
#        is installed. The GPU image has the CPU build and onnxruntime-gpu's wheel (~300 MB) is
#        larger than what a run carries, so here it runs on the CPU's 16 cores (ResNet-152: ~1-2
#        min) unless the image gains it; the int8 gate adds a quantised pass of the same size.
#        If the step hits its limit (E2E_LIMIT, 480 s), run it again with E2E_SCALE=0.5. With E2E_TUTORIAL=1 the tutorial's pipeline is timed too (one epoch,
#        extrapolated; its split script alone re-saves 8,189 JPEGs on one core, ~1.5 min).
#   gpu: bench/gpu.py without torch.compile: ResNet-152 training images/s at batch 64 (fp32
#        tutorial setup, bf16, bf16 + channels_last), synthetic batches and the real input
#        pipeline, the fraction of bf16 peak (~2 min);
#   check: bench/gpu_check.py: fit/resume/evaluate/predict on CUDA, ResNet-152 at batch 64 and
#        256 (~1 min; already recorded in bench/results/gpu-check-h200.json, so not by default).
# Each step has its own time limit, so a slow one still leaves the others' files. The defaults
# fit one 10-minute command inside a session's 15 minutes of device time.
#
# Usage, on the GPU machine (the device tool's `run`, from the repository root, carrying .whl):
#   bash bench/gpu_run.sh                   # writes into $OUT (or bench/results/gpu-run)
#   STEPS="gpu check" bash bench/gpu_run.sh # another choice of steps: e2e, gpu, check
#
# Installs nothing it does not need. The GPU image has torch, torchvision, numpy, Pillow,
# scipy, matplotlib, onnx and onnxruntime; what flowerml needs beyond those (pydantic and
# pydantic-settings for steps 1-2; Prefect, boto3 and their dependencies for step 3) travels
# as wheels in .whl/ (git-ignored; carry it), installed into /tmp/site, never into the image.
# Fetch them here, once, before the run (Python 3.12 wheels for x86-64 Linux):
#   bash bench/gpu_run.sh --fetch-wheels
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-run}
STEPS=${STEPS:-e2e gpu}

# What the GPU image lacks, as `flowerml retrain` imports it (bench/e2e.py records the
# distributions every process of a run imported: "imported_distributions"), pinned to the
# versions this repository is tested with.
WHEELS_CORE="annotated-types==0.8.0 pydantic==2.14.4 pydantic-core==2.50.5
  pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5"
WHEELS_E2E="aiosqlite==0.22.1 alembic==1.20.1 amplitude-analytics==1.3.0 apprise==2.0.1
    asgi-lifespan==2.1.0 asyncpg==0.32.0 beartype==0.23.1 burner-redis==0.1.7 cachetools==7.3.3
    cffi==2.1.1 coolname==5.0.0 cronsim==2.8 cryptography==50.0.2 cyclopts==5.5.2
    dateparser==1.5.0 docker==7.2.0 docstring-parser==0.18.0 exceptiongroup==1.3.2
    fastapi==0.150.0 graphviz==0.21 greenlet==3.5.6 griffe==2.4.1 griffecli==2.4.1
    griffelib==2.4.1 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 jinja2-humanize-extension==0.4.0
    jsonpatch==1.48 jsonpointer==3.12 jsonschema-specifications==2025.9.1 jsonschema==4.26.0
    mako==1.4.3 oauthlib==4.0.1 opentelemetry-api==1.45.2 orjson==3.13.0 pendulum==3.3.0
    prefect==3.9.1 py-key-value-aio==0.5.0 pycparser==3.12 pydantic-extra-types==2.11.1
    pydocket==0.27.0 python-json-logger==4.2.0 python-slugify==9.1.3 pytz==2026.6 readchar==4.2.2
    redis==8.1.0 referencing==0.37.0 requests-oauthlib==2.0.0 rfc3339-validator==0.1.4
    rich-rst==2.2.0 rpds-py==2026.9.1 ruamel-yaml==0.19.1 semver==3.1.2 sniffio==1.3.1
    sqlalchemy==2.1.9 starlette==1.10.0 text-unidecode==1.3 toml==0.10.2 tzdata==2026.6
    tzlocal==5.4.5 uncalled-for==0.6.2 uvicorn==0.54.0 websockets==16.1.1 whenever==0.11.0"

fetch_wheels() {
  # Here, not on the GPU machine (which reaches no registry).
  mkdir -p .whl
  # shellcheck disable=SC2086
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl $WHEELS_CORE $WHEELS_E2E
  du -sh .whl
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  fetch_wheels
  exit $?
fi

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_run $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_run.log" >&2; }

if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { log "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  nproc; free -g; "$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())';
} > "$OUT/machine.txt" 2>&1
log "machine: $(head -2 "$OUT/machine.txt" | tail -1)"

status=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its stderr into NAME.log
  local name=$1 limit=$2
  shift 2
  log "$name: $* (limit ${limit}s)"
  local started=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@" 2> "$OUT/$name.log"
  local rc=$?
  log "$name: exit $rc after $((SECONDS - started)) s"
  [ $rc -eq 0 ] || status=1
}

for want in $STEPS; do
  case $want in
    gpu)
      step gpu 180 "$PYTHON" bench/gpu.py --skip-compile --out "$OUT/gpu.json" \
        > "$OUT/gpu.stdout.json" ;;
    check)
      step gpu-check 150 "$PYTHON" bench/gpu_check.py > "$OUT/gpu-check.json" ;;
    e2e)
      tutorial=--no-tutorial
      [ "${E2E_TUTORIAL:-0}" = 1 ] && tutorial="--tutorial-test-images 480"
      # shellcheck disable=SC2086
      step e2e-gpu "${E2E_LIMIT:-480}" "$PYTHON" bench/e2e.py --case gpu --scale "${E2E_SCALE:-1}" \
        $tutorial --workdir /tmp/flowerml-e2e --out "$OUT/e2e-gpu.json" \
        --chart "$OUT/e2e-gpu.png" > /dev/null ;;
    *) log "unknown step $want (gpu, check, e2e)"; status=1 ;;
  esac
done
ls -la "$OUT" >&2
exit $status
