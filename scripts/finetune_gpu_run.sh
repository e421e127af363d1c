#!/usr/bin/env bash
# Composition fine-tuning of picaso-mini v2 on the H200 (issue "fine-tune v3"): four recipes trained
# side by side from v2, then every candidate and v2 itself through the same evaluation harness
# (WikiText k = 0, 5, 10; HotpotQA k = 0, 10; SQuAD k = 0, 5, 10; all methods), and the best
# candidate's checkpoint back.
#
# The device machine reaches nothing and receives at most 64 MiB a call with the working tree
# (about 40 MB of it tracked), so the data travel in two parts to one warm machine: a uniform sample of
# the whole tokenized corpus (scripts/finetune_sample.py) and the evaluation sets. The code travels as
# `git archive HEAD` (frozen: the working tree may change between calls). Steps:
#
#   here:  bash scripts/finetune_gpu_run.sh pack      # tokenise (cached in $TOK), sample, .ft_gpu/all/part-0N + SHA256
#   there, one call per part, carry [".ft_gpu/send"] (here: copy part N alone into .ft_gpu/send):
#          bash scripts/finetune_gpu_run.sh receive   # the first part also sets up mamba-ssm and warms the kernels
#   there: bash scripts/finetune_gpu_run.sh train     # after the last part: unpack, train the recipes (background), wait
#   there: bash scripts/finetune_gpu_run.sh wait      # until trained (bounded)
#   there: bash scripts/finetune_gpu_run.sh evaluate  # every candidate + v2, results -> $OUT, best checkpoint in parts
#   here:  python scripts/finetune_report.py DIR      # the one table, the plot
set -uo pipefail
cd "$(dirname "$0")/.."
TRAIN_S=${TRAIN_S:-400}        # seconds of training per recipe (all run at once on the one GPU)
PART_BYTES=${PART_BYTES:-19000000}
TOK=${TOK:-/tmp/ft}            # here: the tokenized shards
W=${W:-/root/ft}               # there: everything this run keeps between calls
F=$W/frozen
R=$W/results
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

# name | arguments after `finetune --model v2 --data passages.bin` (the recipes compared)
RECIPES="bptc-s|--mode bptc --method picaso-s
bptc-sr-mix|--mode bptc --method picaso-s,picaso-r --concat-fraction 0.15 --lm-fraction 0.15
bptc-all-mix|--mode bptc --method picaso-s,picaso-r,caso,soup --concat-fraction 0.15 --lm-fraction 0.15
bp2c-sr-mix|--mode bp2c --method picaso-s,picaso-r --concat-fraction 0.15 --lm-fraction 0.15"
# ONLY="bptc-s bptc-sr-mix": train and evaluate these recipes alone (fewer share the GPU: more steps each)
[ -n "${ONLY:-}" ] && RECIPES=$(echo "$RECIPES" | grep -E "^($(echo $ONLY | tr ' ' '|'))\|")

case "${1:-}" in
pack)  # here
    if [ ! -e $TOK/tokenized ]; then
        mkdir -p $TOK
        for s in 0 1 2 3 4 5 6 7 8; do echo $s; done | xargs -P 2 -I{} sh -c "RAYON_NUM_THREADS=1 python -m picaso_rag.training tokenize \
            --shards ../shared/corpus/corpus-00{}.txt.xz --tokenizer models/picaso-mini/tokenizer.json \
            --exclude-hotpotqa ../shared/data/hotpotqa-dev-distractor-100.json --out $TOK/shard-{}.bin > $TOK/tok-{}.log 2>&1"
        touch $TOK/tokenized
    fi
    rm -rf .ft_gpu/all .ft_gpu/data && mkdir -p .ft_gpu/all/files
    grep -qxF "/.ft_gpu/" .git/info/exclude || echo "/.ft_gpu/" >> .git/info/exclude
    python scripts/finetune_sample.py --shards $TOK/shard-?.bin --passages 90000 --lm-windows 6000 --out .ft_gpu/data || exit 1
    xz -T2 -6 .ft_gpu/data/passages.bin .ft_gpu/data/lm.bin
    git archive -o .ft_gpu/all/files/code.tar HEAD picaso_rag benchmarks scripts docs/results/wikitext-retrieval.json docs/results/squad-retrieval-500.json
    cp .gpu/mamba_ssm-2.3.2.post1.tar.gz ../shared/data/wikitext-2-raw-test.txt ../shared/data/hotpotqa-dev-distractor-100.json \
       ../shared/data/squad-v2-dev-cs224n.json .ft_gpu/data/* .ft_gpu/all/files/
    git rev-parse HEAD > .ft_gpu/all/files/COMMIT
    # code, mamba-ssm and the evaluation data first: the first part alone lets set-up and warm-up begin
    (cd .ft_gpu/all/files && tar cf ../bundle.tar COMMIT code.tar mamba_ssm-*.tar.gz *.txt *.json lm.bin.xz passages.bin.xz)
    (cd .ft_gpu/all && split -b "$PART_BYTES" -d bundle.tar part- && sha256sum bundle.tar > SHA256 && rm -rf files bundle.tar)
    ls -la .ft_gpu/all
    ;;
receive)  # there, once per part
    mkdir -p $W $R
    cp .ft_gpu/send/SHA256 $W/ 2>/dev/null
    cat .ft_gpu/send/part-* >> $W/bundle.tar
    echo "received: $(ls .ft_gpu/send | grep part- | tr '\n' ' ')($(stat -c %s $W/bundle.tar) bytes)"
    if [ ! -e $W/warm.started ]; then  # code + mamba-ssm from the first part; warm the kernels while the rest travels
        touch $W/warm.started
        mkdir -p $F $W/data
        tar --occurrence=1 -xf $W/bundle.tar -C $W/data code.tar COMMIT mamba_ssm-2.3.2.post1.tar.gz || exit 1
        tar xf $W/data/code.tar -C $F && cp -r models $F/ && echo "code at $(cat $W/data/COMMIT)"
        mkdir -p .gpu && cp $W/data/mamba_ssm-*.tar.gz .gpu/ && ${SETUP:-bash scripts/gpu_setup.sh build} > $R/setup.log 2>&1 || { cat $R/setup.log; exit 1; }
        python3 -c "import numpy as np; t = np.random.default_rng(0).integers(1, 16384, 2_000_000, dtype=np.uint16); t[256::257] = 0; t.tofile('$W/random.bin')"  # EOS (0) ends each 256-token passage
        # the same shapes as the real runs: Triton compiles each kernel once into ~/.triton/cache
        cd $F && setsid bash -c "
            python3 -m picaso_rag.training finetune --model models/picaso-mini --data $W/random.bin --n-passages 4000 --max-steps 12 \
              --mode bptc --method picaso-s,picaso-r --concat-fraction 0.3 --lm-fraction 0.3 --out $W/warm-bptc > $R/warm-bptc.log 2>&1 &
            python3 -m picaso_rag.training finetune --model models/picaso-mini --data $W/random.bin --n-passages 4000 --max-steps 12 \
              --mode bp2c --method picaso-s,caso,soup --out $W/warm-bp2c > $R/warm-bp2c.log 2>&1 & wait; touch $W/warm" < /dev/null > /dev/null 2>&1 &
        echo "set-up done; warming the kernels in the background"
    fi
    ;;
train)  # there, after the last part
    (cd $W && sha256sum bundle.tar | cut -d' ' -f1 | cmp -s - <(cut -d' ' -f1 SHA256)) || { echo "bundle checksum mismatch"; exit 1; }
    tar xf $W/bundle.tar -C $W/data && rm $W/bundle.tar && xz -d -T8 -f $W/data/passages.bin.xz $W/data/lm.bin.xz || exit 1
    mkdir -p $W/shared/data && cp $W/data/*.txt $W/data/*-dev-*.json $W/shared/data/  # the benchmarks read ../shared/data beside the code
    for i in $(seq 240); do [ -e $W/warm ] && break; sleep 1; done
    echo "warm-up: $(grep -h final_loss $R/warm-*.log | tr '\n' ' ')"; tail -n 3 $R/warm-*.log | grep -i error
    cd $F && setsid bash -c "$(echo "$RECIPES" | while IFS='|' read -r name args; do
            echo "python3 -m picaso_rag.training finetune --model $F/models/picaso-mini --data $W/data/passages.bin --lm-data $W/data/lm.bin --n-passages 1000000 --epochs 100 --time-budget $TRAIN_S --out $W/runs/$name $args > $R/train-$name.log 2>&1 &"
        done) wait; touch $W/trained" < /dev/null > /dev/null 2>&1 &
    sleep 45; for f in $R/train-*.log; do echo "$f: $(tail -c 200 $f | tr '\r' '\n' | tail -1)"; done
    $0 wait
    ;;
wait)  # there
    for i in $(seq ${WAIT_S:-480}); do [ -e $W/trained ] && break; sleep 1; done
    for f in $R/train-*.log; do echo "$f: $(tail -c 300 $f | tr '\r' '\n' | tail -2 | tr '\n' ' ')"; done
    [ -e $W/trained ] && echo trained || echo "still training"
    ;;
evaluate)  # there
    cd $F
    nvidia-smi --query-gpu=name --format=csv,noheader > $R/device.txt
    for m in v2 $(echo "$RECIPES" | cut -d'|' -f1); do
        dir=$W/runs/$m/checkpoint; [ $m = v2 ] && dir=models/picaso-mini
        [ $m != v2 ] && cp $W/runs/$m/history.json $R/history-$m.json
        ( timeout ${EVAL_S:-420} python3 benchmarks/quality.py --model $dir --k 0 5 10 --retrieval-cache docs/results/wikitext-retrieval.json \
              --batch-size 64 --out $R/wikitext-$m > $R/wikitext-$m.log 2>&1 ) &
        ( timeout ${EVAL_S:-420} python3 benchmarks/qa_quality.py --model $dir --dataset hotpotqa --no-generate --out $R/hotpotqa-$m > $R/hotpotqa-$m.log 2>&1
          timeout ${EVAL_S:-420} python3 benchmarks/qa_quality.py --model $dir --dataset squad --k 0 5 10 --limit 500 --no-generate \
              --retrieval-cache docs/results/squad-retrieval-500.json --out $R/squad-$m > $R/squad-$m.log 2>&1 ) &
    done
    wait
    best=$(python3 scripts/finetune_report.py $R --best-only) || best=""
    echo "best: $best"
    tar czf "$OUT/finetune_results.tar.gz" -C $W results
    # the checkpoint (about 35 MB) comes back in parts of 15 MB (the device tool returns files of 16 MiB at most)
    [ -n "$best" ] && (cd $W/runs/$best && tar cf - checkpoint | split -b 15000000 -d - "$OUT/ft-$best-checkpoint.tar.")
    ls -la "$OUT"
    ;;
*)
    echo "usage: $0 pack|receive|train|wait|evaluate"; exit 2 ;;
esac
