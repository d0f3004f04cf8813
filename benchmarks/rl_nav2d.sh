#!/usr/bin/env bash
# 2D navigation meta-RL beside the paper's appendix Table 4 (BENCHMARKS.md, "Meta-RL").
#   bash benchmarks/rl_nav2d.sh                       # the presets' 300 meta-iterations each
#   MAML_ITERATIONS=300 BASELINE_ITERATIONS=150 bash benchmarks/rl_nav2d.sh   # what BENCHMARKS.md reports
# Trains MAML (second order, TRPO outer loop), the pretrained policy (TRPO on all tasks)
# and the oracle (goal in the observation) into runs/bench-rl/, then evaluates them and a
# random initialisation on the same 40 fixed test tasks after 0..3 policy-gradient steps.
# Reruns resume finished or interrupted runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FEWSHOT=${FEWSHOT:-$ROOT/.venv/bin/fewshot}
RUNS=${RUNS:-$ROOT/runs/bench-rl}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$ROOT/benchmarks/results"
"$FEWSHOT" train nav2d-maml --out "$RUNS/nav2d-maml" --resume --no-progress --iterations "${MAML_ITERATIONS:-300}"
"$FEWSHOT" train nav2d-pretrained --out "$RUNS/nav2d-pretrained" --resume --no-progress --iterations "${BASELINE_ITERATIONS:-300}"
"$FEWSHOT" train nav2d-oracle --out "$RUNS/nav2d-oracle" --resume --no-progress --iterations "${BASELINE_ITERATIONS:-300}"
"$FEWSHOT" eval "$RUNS/nav2d-maml" "$RUNS/nav2d-pretrained" "$RUNS/nav2d-oracle" | tee "$ROOT/benchmarks/results/rl_nav2d.md"
"$FEWSHOT" plot "$RUNS/nav2d-maml" "$RUNS/nav2d-pretrained" "$RUNS/nav2d-oracle" --out "$ROOT/benchmarks/results"
