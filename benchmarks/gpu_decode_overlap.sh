#!/usr/bin/env bash
# One GPU: decode steps overlapped with the host's work against one at a time.
#   bash benchmarks/gpu_decode_overlap.sh OUT COMMIT engine   # the GPU decode tests, then decode_gpu.py --overlap both
#   bash benchmarks/gpu_decode_overlap.sh OUT COMMIT serve    # gpu_serve_anatomy.sh with --decode-overlap on, then off
set -u
OUT=${1:?out dir}; COMMIT=${2:?commit}; WHAT=${3:-engine}
BUDGET=${BUDGET:-560}
source benchmarks/gpu_env.sh
case $WHAT in
  engine)
    run_in_budget tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py tests/test_gpu_attention.py
    run_in_budget decode 380 python3 benchmarks/decode_gpu.py --case qwen3-235b-a22b:8:fp8 --case deepseek-v3:5:fp8 \
      --batches 64,32,8,1 --steps 40 --overlap both --context 8192 --out "$OUT/decode_overlap_$COMMIT.json"
    cat "$OUT/log"; tail -3 "$OUT/tests.txt"; grep overlap "$OUT/decode.txt" ;;
  serve)
    for mode in ${MODES:-on off}; do  # each run: a fresh server, a warm-up pass, the measured loadtests
      echo "$(date +%T) serve $mode" >> "$OUT/log"
      SERVE_ARGS="--decode-overlap $mode" timeout -k 5 ${PER_RUN:-280} bash benchmarks/gpu_serve_anatomy.sh \
        "$OUT/serve_$mode" "$COMMIT" > "$OUT/serve_$mode.txt" 2>&1
      echo "$(date +%T) serve $mode rc=$?" >> "$OUT/log"
      pkill -f "dwdp.cli serve" || true  # a server the timeout left behind
    done
    cat "$OUT/log" "$OUT"/serve_*/log; for f in "$OUT"/serve_*/anatomy.txt; do echo "$f"; grep "C=\|ok in" "$f"; done ;;
esac
