#!/usr/bin/env bash
# The README performance table in one command: research.benchmark with --compare=hf_torch for
# gpt_small (pretrain_causal) and bert_base (pretrain_mlm_nsp), each at its configured dropout
# and at dropout 0 (hidden and attention: the peer's eager dropout costs more than ours, so the
# dropout-0 rows compare the rest at equal settings); one Markdown row each.
#   bash experiments/benchmark_table.sh [extra benchmark flags, e.g. --gin.BATCH_SIZE=16]
# Defaults: batch 8 x sequence 256, 2 warm-up + 7 timed steps; later flags override them.
# Full outputs (with each run's JSON line) go to $BENCHMARK_TABLE_DIR (default
# runs/benchmark_table). $PYTHON picks the interpreter (default python3).
# Runs with RESEARCH_HUGEPAGES=keep unless it is set: ours and the peer (one process) both keep
# freed memory in malloc's heap, so neither side's next step pays for memory the host took back
# while the other side's step ran (research/training/hugepages.py, README "Performance").
set -euo pipefail
export RESEARCH_HUGEPAGES=${RESEARCH_HUGEPAGES:-keep}
cd "$(dirname "$0")/.."
OUT=${BENCHMARK_TABLE_DIR:-runs/benchmark_table}
PY=${PYTHON:-python3}
EXTRA=("$@")
NO_DROPOUT=(--gin.TransformerConfig.dropout_rate=0.0 --gin.TransformerConfig.attention_dropout_rate=0.0)
mkdir -p "$OUT"
"$PY" -c "from research.benchmark import TABLE_HEADER; print(TABLE_HEADER)"
for pair in "gpt_small pretrain_causal" "bert_base pretrain_mlm_nsp"; do
  read -r model run <<< "$pair"
  for dropout in configured 0; do
    flags=()
    [ "$dropout" = 0 ] && flags=("${NO_DROPOUT[@]}")
    name="${model}_dropout_$dropout"
    "$PY" -m research.benchmark --gin_file="configs/models/$model.gin" \
        --gin_file="configs/runs/$run.gin" --gin.BATCH_SIZE=8 --gin.SEQ_LEN=256 \
        --steps 7 --warmup 2 --compare=hf_torch "${flags[@]}" "${EXTRA[@]}" > "$OUT/$name.txt" 2>&1 \
      || { echo "benchmark of $name failed; see $OUT/$name.txt" >&2; exit 1; }
    sed -n 's/^table row: //p' "$OUT/$name.txt"
  done
done
