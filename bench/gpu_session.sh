#!/usr/bin/env bash
# One call on a GPU machine, at most 7 minutes, for what a CPU cannot check or measure:
#     run(command="bash bench/gpu_session.sh", timeout_s=450)
# Nothing is installed but this package (pip install --no-deps --no-build-isolation -e .). Each stage
# is `python -m bench.session STAGE` (bench/session.py holds the logic) in a process of its own,
# under its own time limit, writing to a file under $OUT as it goes: a stage killed at its limit
# keeps what it wrote, and says it was killed. OUT defaults to .bench/gpu-session (gitignored).
#
#   file under $OUT       what                                                    limit s  expected s
#   0-summary.txt         one line per stage: STATUS, exit code, seconds taken         -        -
#   1-environment.txt     the install; nvidia-smi, versions, SMs, L2, packages      45 + 20   10 + 10
#   2-extension.txt       the cuda extension's build, in the background while         240   60-120
#                         stages 3 and 4 run (stage 5 waits for it)
#   3-compile-check.txt   the compile check for the device's own target, 3 dtypes      45       15
#   4-triton-tests.txt    the GPU-marked triton tests and the triton contract subset  150   60-120
#                         (about 100 Triton specialisations to compile: bench/session.py)
#   5-cuda-tests.txt      the cuda backend's GPU-marked tests and its contract, and     60       30
#                         backend="auto" (it asks after every backend's extension)
#   6-microbench.txt      bf16 matmul at 8192³ and at the cuda chunk GEMMs; L2, HBM     30       10
#   7-timings.txt         B=1024 D=512 bf16 C=100k,1M,4M: triton, cuda, torch to 1M,    80       40
#                         per kernel, working memory, bench/model's PREDICTED times
#
# Python's start and torch's import cost each stage 5-10 s there; they are in the figures above.
# The limits add up to more than the call may take: each is also cut to what is left before a
# 405 s deadline (420 s less the kills' 5 s grace and the copy-back), so a stage that overruns
# squeezes the stages after it, never the call. Expected in all: about 4-5 minutes.
#
# `bash bench/gpu_session.sh --dry-run` runs every stage on the CPU at tiny shapes (Triton under
# its interpreter; no install) within 170 s; tests/test_gpu_session.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-.bench/gpu-session}
dry=()
deadline=405
if [[ ${1:-} == --dry-run ]]; then
  dry=(--dry-run)
  deadline=170
  export TRITON_INTERPRET=1  # read by Triton when it is imported (the compile check unsets it)
  export CUDA_VISIBLE_DEVICES=  # on the CPU, also where a GPU is present
fi
mkdir -p "$out"
rm -f "$out"/[0-7]-*.txt
export PYTHONUNBUFFERED=1
summary=$out/0-summary.txt
failed=0

limit_for() {  # limit_for BUDGET: the budget, cut to the time left before the deadline
  local left=$((deadline - SECONDS))
  echo $((left < $1 ? left : $1))
}

stage() {  # stage NUMBER NAME BUDGET [ARGS...]: one stage under its limit; its exit code
  local number=$1 name=$2 limit began=$SECONDS rc
  limit=$(limit_for "$3")
  shift 3
  local file=$out/$number-$name.txt
  if ((limit < 5)); then
    echo "STATUS: skipped — no time left before the session's ${deadline} s deadline" >>"$file"
    rc=0
  else
    timeout -k 5 "$limit" "$python" -m bench.session "$name" "${dry[@]}" "$@" </dev/null >>"$file" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
      echo "STATUS: failed — killed at its ${limit} s limit" >>"$file"
    elif ! grep -q '^STATUS:' "$file"; then
      echo "STATUS: failed — exited ${rc} without a status" >>"$file"
    fi
  fi
  echo "$number $name: $(grep '^STATUS:' "$file" | tail -1 | cut -c9-) [exit $rc, $((SECONDS - began)) s of $limit]" | tee -a "$summary"
  return "$rc"
}

if ((${#dry[@]})); then
  echo "install: not run (dry run: the package is installed where the dry run runs)" >"$out/1-environment.txt"
else
  timeout -k 5 45 "$python" -m pip install --no-deps --no-build-isolation -e . >"$out/1-environment.txt" 2>&1
  rc=$?
  echo "install: exit $rc [$SECONDS s]" | tee -a "$summary"
  if ((rc != 0)); then
    tail -5 "$out/1-environment.txt"
    exit 1
  fi
fi
stage 1 environment 20 || failed=1
stage 2 extension 240 &
build=$!
stage 3 compile-check 45 || failed=1
stage 4 triton-tests 150 || failed=1
wait "$build"
built=$?
stage 5 cuda-tests 60 --extension-status "$built" || failed=1
stage 6 microbench 30 || failed=1
stage 7 timings 80 || failed=1
((built == 0)) || failed=1

echo "--- $out/6-microbench.txt"
grep -v '^\$ ' "$out/6-microbench.txt"
echo "--- $out/7-timings.txt (the table)"
grep -E '^(\||STATUS)' "$out/7-timings.txt"
echo "session: ${SECONDS} s; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$failed"
