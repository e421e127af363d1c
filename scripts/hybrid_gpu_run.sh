#!/usr/bin/env bash
# One GPU call: train our small hybrid (the picaso-mini recipe, layers 5 and 11 NoPE attention) and,
# for an equal-budget comparison, the same recipe all Mamba-2; then the WikiText protocol and HotpotQA
# (answer NLL) for both and for the shipped picaso-mini. Results land in $OUT/hybrid_results.tar.gz.
#
# Here, first (the machine reaches nothing, and ../shared does not travel):
#   mkdir -p .hybrid_gpu && echo /.hybrid_gpu/ >> .git/info/exclude
#   cp ../shared/corpus/{corpus-000.txt.xz,MANIFEST.tsv.gz} ../shared/data/{wikitext-2-raw-test.txt,hotpotqa-dev-distractor-100.json} \
#      .gpu/mamba_ssm-2.3.2.post1.tar.gz .hybrid_gpu/      # (scripts/gpu_setup.sh fetch makes the .gpu sdist)
# Then with the device tool: command `bash scripts/hybrid_gpu_run.sh`, carry [".hybrid_gpu"].
# TRAIN_S: training seconds per model (both train at once, on the one GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
TRAIN_S=${TRAIN_S:-140}
PASSAGES=${PASSAGES:-500}
OUT=${OUT:-/tmp/out}
R=/tmp/hybrid_results
mkdir -p $R "$OUT" ../shared/data ../shared/corpus .gpu
cp .hybrid_gpu/*.txt .hybrid_gpu/*.json ../shared/data/
cp .hybrid_gpu/corpus-000.txt.xz .hybrid_gpu/MANIFEST.tsv.gz ../shared/corpus/
cp .hybrid_gpu/mamba_ssm-*.tar.gz .gpu/ 2>/dev/null
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$(pwd)
T0=$(date +%s)
bash scripts/gpu_setup.sh build > $R/setup.log 2>&1 || { cat $R/setup.log; exit 1; }
python3 -m picaso_rag.training tokenize --shards ../shared/corpus/corpus-000.txt.xz --tokenizer models/picaso-mini/tokenizer.json \
    --exclude-hotpotqa ../shared/data/hotpotqa-dev-distractor-100.json --out /tmp/train.bin > $R/tokenize.log 2>&1
echo "set-up and tokenisation: $(( $(date +%s) - T0 )) s; $(tail -1 $R/tokenize.log)"
COMMON="--data /tmp/train.bin --tokenizer models/picaso-mini/tokenizer.json --d-model 384 --n-layer 12 --seq-len 1024 --batch-size 64 --time-budget $TRAIN_S"
python3 -m picaso_rag.training pretrain $COMMON --attn-layers 5 11 --out /tmp/runs/hybrid > $R/train_hybrid.log 2>&1 &
python3 -m picaso_rag.training pretrain $COMMON --out /tmp/runs/mamba > $R/train_mamba.log 2>&1 &
wait
tail -1 $R/train_hybrid.log; tail -1 $R/train_mamba.log
cp /tmp/runs/hybrid/history.json $R/history_hybrid.json; cp /tmp/runs/mamba/history.json $R/history_mamba.json
cp /tmp/runs/hybrid/checkpoint/config.json $R/hybrid_config.json
echo "trained: $(( $(date +%s) - T0 )) s"
for m in hybrid mamba picaso-mini; do
    dir=/tmp/runs/$m/checkpoint; [ $m = picaso-mini ] && dir=models/picaso-mini
    ( timeout ${EVAL_S:-100} python3 benchmarks/quality.py --model $dir --k 0 5 10 --max-passages $PASSAGES --retrieval-cache docs/results/wikitext-retrieval.json \
          --batch-size 64 --out $R/wikitext-$m > $R/wikitext-$m.log 2>&1
      timeout ${QA_S:-60} python3 benchmarks/qa_quality.py --model $dir --dataset hotpotqa --no-generate --out $R/hotpotqa-$m > $R/hotpotqa-$m.log 2>&1 ) &
done
wait
echo "evaluated: $(( $(date +%s) - T0 )) s"
for m in hybrid mamba picaso-mini; do cat $R/wikitext-$m.md $R/hotpotqa-$m.md 2>/dev/null || tail -5 $R/wikitext-$m.log $R/hotpotqa-$m.log; done
nvidia-smi --query-gpu=name --format=csv,noheader > $R/device.txt
tar czf "$OUT/hybrid_results.tar.gz" -C /tmp hybrid_results
