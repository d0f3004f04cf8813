#!/usr/bin/env bash
# Cost of the HalfCheetah presets (BENCHMARKS.md, "Meta-RL"): a few meta-iterations of
# cheetah-vel-maml with the paper's sizes (40 tasks x 20 trajectories x 200 steps, twice
# per iteration), then seconds per meta-iteration and environment steps per second from metrics.csv.
#   ITERATIONS=2 bash benchmarks/rl_cheetah_speed.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FEWSHOT=${FEWSHOT:-$ROOT/.venv/bin/fewshot}
RUNS=${RUNS:-$ROOT/runs/bench-rl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$FEWSHOT" train cheetah-vel-maml --out "$RUNS/cheetah-vel-maml" --resume --no-progress --iterations "${ITERATIONS:-2}"
column -s, -t < "$RUNS/cheetah-vel-maml/metrics.csv"
