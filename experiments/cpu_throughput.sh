#!/usr/bin/env bash
# Training throughput of a model config on this machine's CPU through the real training CLI
# (data pipeline, sharded step, logging all included). Prints the steady-state tokens/s
# (the mean of the logged windows after the first, which holds compilation).
#   bash experiments/cpu_throughput.sh [MODEL=gpt_small] [BATCH=8] [SEQ=256] [STEPS=30]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-gpt_small}; BATCH=${2:-8}; SEQ=${3:-256}; STEPS=${4:-30}
DIR=$(mktemp -d)
python -m research.train --gin_file="configs/models/$MODEL.gin" \
    --gin_file=configs/runs/pretrain_causal.gin --gin.TRAIN_STEPS="$STEPS" \
    --gin.BATCH_SIZE="$BATCH" --gin.SEQ_LEN="$SEQ" --gin.EVAL_DATA=None \
    --gin.train.log_every=5 --gin.train.checkpoint_every=100000 --gin.train.progress_bar=False \
    --gin.MESH_SHAPE="{'data': 1}" --workdir="$DIR" > "$DIR/log.txt" 2>&1
python - "$DIR/metrics.jsonl" "$MODEL" "$BATCH" "$SEQ" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
tps = sum(r["train/tokens_per_sec"] for r in rows) / len(rows)
print(json.dumps({"model": sys.argv[2], "batch": int(sys.argv[3]), "seq_len": int(sys.argv[4]),
                  "tokens_per_sec": round(tps, 1), "windows": len(rows)}))
PY
rm -rf "$DIR"
