#!/usr/bin/env bash
# The rest of the GPU work, for a session with time left after bench/gpu_session.sh: one call of at
# most 9 minutes,
#     run(command="bash bench/gpu_sweep.sh", carry=[".whl"], timeout_s=570)
# The GPU machine has no internet: before the call, in the repository's root here, fetch the
# peers' wheels (pure Python; .whl/ is gitignored; what they need besides, torch, triton, numpy,
# scikit-learn and tqdm, is on the GPU machine):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytorch-metric-learning==2.9.0
# Nothing else is installed. OUT defaults to .bench/gpu-sweep (gitignored).
#
#   file under $OUT               what                                                   limit s
#   0-summary.txt                 one line per step: exit code, seconds taken                  -
#   1-install.txt                 this package (pip install -e); .whl/*.whl into               45
#                                 /tmp/site; the cuda extension's build (python -m           15
#                                 bench.session extension: 60-120 s on a fresh machine,      240
#                                 none where a warm one has it in its cache)
#   2-compile.txt                 torch.compile through triton on CUDA tensors (the           90
#                                 GPU-marked tests of tests/test_compile.py)
#   3-sweep.txt                   python -m bench: bf16, B = 1024, D = 512,                 the rest
#                                 C = 10k, 100k, 1M, 4M, 16M, every provider here (class
#                                 centres drawn on the GPU, one worker process, each
#                                 point at most 60 s); then python -m bench.report            30
#   results.csv                   the sweep's rows, each appended as its point finished
#   <device>_bf16_B1024_D512.png  the report's plot
#   <device>.md                   the report's table
#
# Every limit is also cut to what is left before a 525 s deadline (540 s less the kills' grace
# and the copy-back), the report's 30 s held back from the sweep: with the extension in the
# cache the sweep gets about 6 minutes, after a fresh build about 4. A sweep stopped at its limit
# keeps every row it finished and records the point it was measuring as killed; the report is
# drawn from what is there.
#
# `bash bench/gpu_sweep.sh --dry-run` runs the same steps on the CPU at tiny shapes (no install,
# no wheels); tests/test_gpu_session.py runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-.bench/gpu-sweep}
deadline=525
report_s=30
sweep=(--dtype bf16 --batch 1024 --dim 512 --classes 10000 100000 1000000 4000000 16000000 --repeats 10 --timeout 60)
dry=()
if [[ ${1:-} == --dry-run ]]; then
  dry=(--dry-run)
  deadline=170
  sweep=(--device cpu --providers torch triton cuda --dtype fp32 --batch 16 --dim 32 --classes 100 1000 --repeats 1)
  export CUDA_VISIBLE_DEVICES=  # on the CPU, also where a GPU is present
fi
mkdir -p "$out"
rm -f "$out"/[0-3]-*.txt "$out"/results.csv "$out"/*.png "$out"/*.md
export PYTHONUNBUFFERED=1
summary=$out/0-summary.txt
failed=0

step() {  # step NAME BUDGET HELD_BACK FILE COMMAND...: COMMAND, its output appended to FILE, under
  # its budget cut to what is left before the deadline less HELD_BACK seconds for later steps
  local name=$1 limit=$2 left=$((deadline - $3 - SECONDS)) file=$4 began=$SECONDS rc
  shift 4
  limit=$((left < limit ? left : limit))
  if ((limit < 5)); then
    echo "$name: not run: no time left before the ${deadline} s deadline" | tee -a "$summary" "$file"
    failed=1
    return
  fi
  timeout -k 5 "$limit" "$@" </dev/null >>"$file" 2>&1
  rc=$?
  ((rc == 124 || rc == 137)) && echo "killed at its ${limit} s limit" >>"$file"
  ((rc == 0)) || failed=1
  echo "$name: exit $rc, $((SECONDS - began)) s of $limit" | tee -a "$summary"
}

if ((${#dry[@]})); then
  echo "install: not run (dry run: the package is installed where the dry run runs)" >"$out/1-install.txt"
else
  step install 45 0 "$out/1-install.txt" "$python" -m pip install --no-deps --no-build-isolation -e .
  if compgen -G ".whl/*.whl" >/dev/null; then
    step peers 15 0 "$out/1-install.txt" "$python" -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  else
    echo "peers: no wheels in .whl/ (see this script's header): liger-kernel and cut-cross-entropy are not run" \
      | tee -a "$summary" "$out/1-install.txt"
  fi
fi
step extension 240 0 "$out/1-install.txt" "$python" -m bench.session extension "${dry[@]}"
step compile 90 0 "$out/2-compile.txt" "$python" -m pytest -q -rfEs -p no:cacheprovider tests/test_compile.py -m gpu
step sweep 330 "$report_s" "$out/3-sweep.txt" "$python" -m bench "${sweep[@]}" --results "$out/results.csv"
step report "$report_s" 0 "$out/3-sweep.txt" "$python" -m bench.report --results "$out/results.csv" --out "$out"

echo "--- $out/3-sweep.txt (the rows)"
grep -E '^ +[a-z-]+ +(bf16|fp32|fp16) ' "$out/3-sweep.txt"
echo "--- $out/2-compile.txt"
tail -3 "$out/2-compile.txt"
echo "sweep session: ${SECONDS} s; files in $out: $(ls "$out" | tr '\n' ' ')"
exit "$failed"
