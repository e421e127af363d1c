#!/usr/bin/env bash
# GPU check of the one-model refactor: the same benchmarks on the code before it (a tree in
# baseline/, made here with `git archive <commit> picaso_rag benchmarks | tar -x -C baseline`, never
# committed) and on this working tree, in one call on one machine, so that before/after compare.
#
#   here:  rm -rf baseline && mkdir baseline && git archive 2e02388 picaso_rag benchmarks | tar -x -C baseline
#   there: bash scripts/one_model_gpu_check.sh checks    # correctness: graphs vs eager, vs mamba_ssm / transformers
#   there: bash scripts/one_model_gpu_check.sh latency   # Mamba-2 2.7b decode + TTFT, picaso-mini TTFT, both trees
#   there: bash scripts/one_model_gpu_check.sh serving   # Mamba-2 2.7b continuous batching, both trees
# Results land in $OUT/<tree>/ (tree: before, after).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
[ -f /tmp/.mamba_ready ] || { bash scripts/gpu_setup.sh build > "$OUT/setup.log" 2>&1 && touch /tmp/.mamba_ready; }
TOK=models/picaso-mini/tokenizer.json

run() {  # run TREE NAME ARGS...: benchmarks/<script> of TREE (baseline/ or .), output in $OUT/<before|after>/
    local tree=$1 name=$2; shift 2
    local label=after; [ "$tree" = baseline ] && label=before
    mkdir -p "$OUT/$label"
    local start=$(date +%s)
    PYTHONPATH=$tree timeout "${LIMIT:-280}" python "$tree/benchmarks/$@" > "$OUT/$label/$name.log" 2>&1
    echo "$label $name rc=$? $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
}

case "${1:-}" in
checks)
    run . gpu_check gpu_check.py --tokenizer $TOK --out "$OUT/after/gpu_check.json"
    run . hybrid_decode hybrid_decode_gpu_check.py --model models/picaso-mini --out "$OUT/after/hybrid_decode.json"
    run . mamba_ssm_hybrid mamba_ssm_hybrid_gpu_check.py --out "$OUT/after/mamba_ssm_hybrid.json"
    ;;
latency)
    for tree in baseline .; do
        label=after; [ "$tree" = baseline ] && label=before
        run $tree latency_2.7b latency.py --shapes 2.7b --ks 10 --doc-tokens 512 --methods picaso-s --repeats 3 \
            --encode-batch 16 --tokenizer $TOK --out "$OUT/$label/latency_2.7b.json"
        run $tree latency_picaso_mini latency.py --model models/picaso-mini --ks 2,10 --doc-tokens 512,2048 \
            --methods picaso-s --repeats 5 --out "$OUT/$label/latency_picaso_mini.json"
    done
    ;;
serving)
    for tree in baseline .; do
        label=after; [ "$tree" = baseline ] && label=before
        run $tree serving_2.7b serving.py --shape 2.7b --clients 1,16,64 --modes picaso --k 10 --doc-tokens 512 \
            --window 6 --ramp 2 --tokenizer $TOK --out "$OUT/$label/serving_2.7b.json"
    done
    ;;
*)
    echo "usage: $0 checks|latency|serving" >&2; exit 2 ;;
esac
