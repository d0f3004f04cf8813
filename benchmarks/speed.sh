#!/usr/bin/env bash
# MAML speed beside the peers, interleaved in one run (BENCHMARKS.md, "Speed").
#   bash benchmarks/speed.sh                 # sine workload, 3 rounds
#   WORKLOADS="sine omniglot-5w1s" ROUNDS=2 bash benchmarks/speed.sh
# Needs the peers' venv (bash ../shared/peers/setup.sh); fewshot is installed into it
# without dependencies so every implementation runs on the same torch.
# Output: benchmarks/results/speed.jsonl (one JSON line per run) and speed.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/../shared/peers}
PY=${PEERS_VENV:-/tmp/peers-venv}/bin/python
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-sine}
COMPILE=${COMPILE:-1}
OUT=$ROOT/benchmarks/results
mkdir -p "$OUT"
[ -x "$PY" ] || { echo "no $PY: run bash $PEERS/setup.sh first" >&2; exit 1; }
"$PY" -m pip install -q --no-deps -e "$ROOT" >/dev/null
: > "$OUT/speed.jsonl"
iters() { case $1 in sine) echo 200 ;; omniglot-5w1s) echo 6 ;; *) echo 3 ;; esac; }
run() {  # run WORKLOAD SCRIPT ARGS...
  local wl=$1; shift
  (cd "$PEERS" && timeout 900 "$PY" "$@" --workload "$wl" --order second --iters "$(iters "$wl")" --warmup 3) \
    >> "$OUT/speed.jsonl" 2>> "$OUT/speed.log" || echo "FAILED: $* $wl" >&2
}
for r in $(seq 1 "$ROUNDS"); do
  for wl in $WORKLOADS; do
    echo "round $r/$ROUNDS: $wl" >&2
    run "$wl" bench_l2l.py
    run "$wl" bench_func_loop.py
    run "$wl" bench_func_vmap.py
    run "$wl" "$ROOT/benchmarks/bench_fewshot.py"
    if [ "$COMPILE" = 1 ]; then run "$wl" "$ROOT/benchmarks/bench_fewshot.py" --compile; fi
  done
done
"$PY" "$PEERS/summarize.py" "$OUT/speed.jsonl" > "$OUT/speed.md"
cat "$OUT/speed.md"
