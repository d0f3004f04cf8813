#!/usr/bin/env bash
# Sinusoid accuracy beside the paper's appendix Table 2 (BENCHMARKS.md, "Accuracy").
#   bash benchmarks/sine_accuracy.sh            # 70,000 iterations for every method (about 20 min on 2 cores)
#   ITERATIONS=5000 bash benchmarks/sine_accuracy.sh
# Trains MAML with K = 10 (the paper's training K) and K = 5, the pretrained baseline
# and the oracle into runs/bench/, then evaluates all of them on the same 600 fixed
# meta-test tasks. Reruns resume finished or interrupted runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FEWSHOT=${FEWSHOT:-$ROOT/.venv/bin/fewshot}
RUNS=${RUNS:-$ROOT/runs/bench}
IT="--iterations ${ITERATIONS:-70000}"
mkdir -p "$ROOT/benchmarks/results"
"$FEWSHOT" train sine-maml --out "$RUNS/maml-k10" --resume --no-progress $IT
"$FEWSHOT" train sine-maml --out "$RUNS/maml-k5" --set k_shot=5 --resume --no-progress $IT
"$FEWSHOT" train sine-pretrained --out "$RUNS/pretrained" --resume --no-progress $IT
"$FEWSHOT" train sine-oracle --out "$RUNS/oracle" --resume --no-progress $IT
"$FEWSHOT" eval "$RUNS/maml-k10" "$RUNS/maml-k5" "$RUNS/pretrained" "$RUNS/oracle" | tee "$ROOT/benchmarks/results/accuracy.md"
"$FEWSHOT" plot "$RUNS/maml-k10" "$RUNS/pretrained" --out "$ROOT/benchmarks/results"
