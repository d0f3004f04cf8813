#!/usr/bin/env bash
# learn2learn and fewshot on the 5-way 1-shot second-order workload, with and without the
# allocator settings of BENCHMARKS.md ("Omniglot speed"), interleaved: ROUNDS=2 bash benchmarks/speed_malloc_env.sh
# Needs the peers' venv (bash ../shared/peers/setup.sh). Output: benchmarks/results/speed_malloc_env.jsonl
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/../shared/peers}
PY=${PEERS_VENV:-/tmp/peers-venv}/bin/python
OUT=$ROOT/benchmarks/results/speed_malloc_env.jsonl
[ -x "$PY" ] || { echo "no $PY: run bash $PEERS/setup.sh first" >&2; exit 1; }
"$PY" -m pip install -q --no-deps -e "$ROOT" >/dev/null
: > "$OUT"
TUNED="THP_MEM_ALLOC_ENABLE=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=68719476736"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for settings in "" "$TUNED"; do
    for script in bench_l2l.py "$ROOT/benchmarks/bench_fewshot.py"; do
      (cd "$PEERS" && env $settings "$PY" "$script" --workload omniglot-5w1s --order second --iters 4 --warmup 1) \
        | sed "s/^{/{\"settings\": \"${settings:-default}\", /" >> "$OUT"
    done
  done
done
cat "$OUT"
