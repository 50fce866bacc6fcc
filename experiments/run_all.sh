#!/usr/bin/env bash
# Runs every sweep in experiments/ on this machine and writes each results table next to its
# sweep file (experiments/<study>/results/). Trial directories go under runs/ (git-ignored);
# re-running skips finished trials and resumes unfinished ones.
#   bash experiments/run_all.sh            # all studies
#   bash experiments/run_all.sh gpt_lr_warmup
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PARALLEL=${PARALLEL:-2}
sweep() {  # sweep FILE ROOT OUT
  local start=$SECONDS
  $PY -m research.sweep run "$1" --root="$2" --launcher=local --parallel="$PARALLEL"
  $PY -m research.sweep collect "$2" --out="$3" > /dev/null
  echo "$1: $((SECONDS - start)) s wall" | tee -a "$3/wall_time.txt"
}
want() { [[ $# -eq 0 || " $* " == *" $STUDY "* ]]; }
for STUDY in bert_nsp_ablation bert_downstream gpt_norm_position gpt_lr_warmup; do
  want "$@" || continue
  case $STUDY in
    bert_nsp_ablation)
      sweep experiments/bert_nsp_ablation/pretrain.gin runs/bert_nsp_ablation/pretrain \
            experiments/bert_nsp_ablation/results/pretrain
      sweep experiments/bert_nsp_ablation/finetune.gin runs/bert_nsp_ablation/finetune \
            experiments/bert_nsp_ablation/results/finetune ;;
    bert_downstream)
      for stage in pretrain ner qa; do
        sweep "experiments/bert_downstream/$stage.gin" "runs/bert_downstream/$stage" \
              "experiments/bert_downstream/results/$stage"
      done ;;
    *)
      sweep "experiments/$STUDY/sweep.gin" "runs/$STUDY" "experiments/$STUDY/results" ;;
  esac
done
