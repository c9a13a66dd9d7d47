#!/usr/bin/env bash
# One GPU check; prints one JSON object (bench/gpu_check.py documents its keys). On a CUDA machine, in
# about 5 minutes: (a) the `gpu`-marked tests, then side by side (b) the tiny profile end to end on CUDA
# in bf16, (c) DPO and PPO steps with the policy in 8- and 4-bit and their CUDA peak memory, (d) vLLM
# against the local engine where vllm is installed. Without CUDA every part is skipped with the reason
# (about a second), exit 0. Exits 1 when a part that ran failed.
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to use another interpreter than .venv's
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
start=$SECONDS

reason=$("$PY" bench/gpu_check.py why-skip)
if [ -n "$reason" ]; then
  exec "$PY" bench/gpu_check.py report --skip "$reason" --seconds "$((SECONDS - start))"
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m cai_dpo.cli models prepare embedded tiny >"$out/prepare.log" 2>&1   # model caches, once, before the parts

# part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in $out/NAME.log, status in NAME.rc
part() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo $? >"$out/$name.rc"
}

part gpu_tests 90 "$PY" -m pytest -q -m gpu --junitxml "$out/gpu_tests.xml"   # every test marked gpu
( export CAI_DPO_RUNS="$out/runs"; t=$SECONDS
  part tiny_pipeline 210 "$PY" -m cai_dpo.cli run --profile tiny --run-id gpu-check \
    -p policy.device=cuda -p policy.dtype=bfloat16 -p policy.compute_dtype=bfloat16
  echo $((SECONDS - t)) >"$out/tiny_pipeline.seconds" ) &
part qlora_train 210 bash -c "'$PY' bench/bench_train.py --model tiny --steps 3 --dtype bfloat16 \
  --only dpo_8bit --only dpo_4bit --only ppo_8bit --only ppo_4bit >'$out/qlora_train.json'" &
part vllm 180 "$PY" bench/gpu_check.py vllm "$out/vllm.json" &
wait

"$PY" bench/gpu_check.py report "$out" --seconds "$((SECONDS - start))" | tee "$out/report.json"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$out/report.json"
