#!/usr/bin/env bash
# Everything a GPU machine should check, in one call: install, the whole test suite on the GPU
# (bf16 and the GPU-marked tests included), then the benchmark sweep with its plots, then
# bench/model.py's predictions for the same GPU beside them.
# Logs, results.csv and plots go to $OUT (or bench/results/gpu when OUT is unset).
#
# Peers (cut-cross-entropy, liger-kernel) are benchmarked when importable; on a machine without
# internet, carry their wheels in .whl/ and install them first with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
python3 - <<'PY' | tee "$out/versions.txt"
import datetime, torch, triton
print(datetime.datetime.now(datetime.timezone.utc).isoformat(), torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
python3 -m pytest -q -p no:warnings -rs tests/ 2>&1 | tee "$out/tests.log" | tail -30
python3 -m bench --results "$out/results.csv" "$@" 2>&1 | tee "$out/bench.log" | tail -40
python3 -m bench.report --results "$out/results.csv"
# the performance model's predictions for this GPU, beside the measurements above (labelled as predictions)
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print(next((g for g in ('H200', 'H100', 'A100') if g in n), 'H100'))")
python3 -m bench.model --gpu "$gpu" | tee "$out/model.txt"
