#!/usr/bin/env bash
# MAML speed beside the peers, interleaved in one run (BENCHMARKS.md, "Sinusoid speed", "Omniglot speed").
#   bash benchmarks/speed.sh                                   # sine workload, 3 rounds
#   WORKLOADS="omniglot-5w1s omniglot-20w1s" ROUNDS=1 COMPILE=0 bash benchmarks/speed.sh
#   ORDERS="second first"      orders to time (sine is second order only)
#   IMPLS="l2l higher torchopt torchopt_func func_loop func_vmap fewshot fewshot_kept fewshot_1thread"
#                              subset/order of implementations (default below)
#   (fewshot_kept: after fewshot.device.keep_freed_cpu_memory(), as `fewshot train` does)
# Needs the peers' venv (bash ../shared/peers/setup.sh); fewshot is installed into it
# without dependencies so every implementation runs on the same torch.
# Output: benchmarks/results/$NAME.jsonl (one JSON line per run) and $NAME.md (NAME=speed by default).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/../shared/peers}
PY=${PEERS_VENV:-/tmp/peers-venv}/bin/python
ROUNDS=${ROUNDS:-3}
WORKLOADS=${WORKLOADS:-sine}
ORDERS=${ORDERS:-second}
COMPILE=${COMPILE:-1}
IMPLS=${IMPLS:-l2l func_loop func_vmap fewshot}
OUT=$ROOT/benchmarks/results
NAME=${NAME:-speed}
mkdir -p "$OUT"
[ -x "$PY" ] || { echo "no $PY: run bash $PEERS/setup.sh first" >&2; exit 1; }
"$PY" -m pip install -q --no-deps -e "$ROOT" >/dev/null
: > "$OUT/$NAME.jsonl"
iters() { case $1 in sine) echo 200 ;; omniglot-5w1s) echo 6 ;; *) echo 3 ;; esac; }
warmup() { case $1 in sine) echo 3 ;; *) echo 1 ;; esac; }
run() {  # run WORKLOAD ORDER SCRIPT ARGS...
  local wl=$1 order=$2; shift 2
  (cd "$PEERS" && timeout 900 "$PY" "$@" --workload "$wl" --order "$order" --iters "$(iters "$wl")" --warmup "$(warmup "$wl")") \
    >> "$OUT/$NAME.jsonl" 2>> "$OUT/$NAME.log" || echo "FAILED: $* $wl $order" >&2
}
for r in $(seq 1 "$ROUNDS"); do
  for wl in $WORKLOADS; do
    for order in $ORDERS; do
      [ "$wl" = sine ] && [ "$order" = first ] && continue
      echo "round $r/$ROUNDS: $wl $order" >&2
      for impl in $IMPLS; do
        case $impl in
          l2l) run "$wl" "$order" bench_l2l.py ;;
          higher) run "$wl" "$order" bench_higher.py ;;
          torchopt) [ "$order" = first ] || run "$wl" "$order" bench_torchopt.py ;;  # its MetaSGD idiom: second order only
          torchopt_func) run "$wl" "$order" bench_torchopt.py --api functional ;;
          func_loop) run "$wl" "$order" bench_func_loop.py ;;
          func_vmap) run "$wl" "$order" bench_func_vmap.py ;;
          fewshot) run "$wl" "$order" "$ROOT/benchmarks/bench_fewshot.py"
                   if [ "$COMPILE" = 1 ]; then run "$wl" "$order" "$ROOT/benchmarks/bench_fewshot.py" --compile; fi ;;
          fewshot_kept) run "$wl" "$order" "$ROOT/benchmarks/bench_fewshot.py" --keep-freed-memory ;;
          fewshot_1thread) run "$wl" "$order" "$ROOT/benchmarks/bench_fewshot.py" --task-threads 1 ;;
          *) echo "unknown implementation $impl" >&2; exit 2 ;;
        esac
      done
    done
  done
done
"$PY" "$PEERS/summarize.py" "$OUT/$NAME.jsonl" > "$OUT/$NAME.md"
cat "$OUT/$NAME.md"
