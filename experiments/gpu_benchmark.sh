#!/usr/bin/env bash
# Our train step against the Hugging Face PyTorch peer (eager and torch.compile) on one GPU, with
# the shipped model configs, their configured dropout and default flags; a Markdown table last.
#
#   bash experiments/gpu_benchmark.sh [--wheels DIR] [--out DIR] [--profile] [--tests] [--only NAME]
#       [--variants V1,V2,...] [--no_peers] [--probe]
#
# Cases: gpt_medium and gpt_small at batch 16 x 1024 (GPT-2's vocabulary, 50304 after padding)
# and bert_base (MLM + NSP) at batch 32 x 512 (vocabulary 30522); `--only gpt_medium_nodropout`
# runs gpt_medium without dropout (the settings of the first GPU measurement, issue 14).
# Each runs `python -m research.benchmark --steps 10 --warmup 3 --compare=hf_torch,hf_torch_compile`
# (the peer at equal settings: same shapes, dropout, batch, bf16 autocast over float32 weights,
# fused AdamW, SDPA attention); logs and JSON results go to --out (default runs/gpu_benchmark).
# Timed on an H200 (2026-11-26): `--only bert_base` 163 s end to end (wheels, ours, both peers);
# gpt_medium's case takes about 145 s before its peers, so all three take about 9-10 minutes
# (a case gets at most 300 s; --only NAME runs one).
#
# A bare GPU machine whose Python has JAX (CUDA), flax, optax, orbax-checkpoint, torch and
# transformers but not gin-config, tensorflow-datasets and their small dependencies gets them
# from --wheels DIR (a folder of .whl files, e.g. made with `pip download --no-deps`; see
# experiments/README.md), installed into a temporary folder on PYTHONPATH, nothing else touched.
# --profile also writes a jax.profiler trace of two timed steps of each case to OUT/NAME.profile
# and prints where the device time went (python -m research.trace_summary). --tests first runs
# the GPU-only tests of the cuDNN attention path (forward, gradients, fallback, dropout masks).
# --only NAME runs one case.
#
# Tuning A/B: --variants runs each case once per named variant (ours only with --no_peers), each
# a change of gin bindings or XLA flags against the defaults, and prints one line per run:
#   default          the shipped defaults
#   guard_cond       update_guard.kind='cond' (the CPU's non-finite guard: a branch)
#   scan             TransformerConfig.scan_layers=True (one scanned layer body)
#   dropout16        TransformerConfig.dropout_bits=16 (the CPU's 16-bit dropout bits)
#   no_triton_gemm   XLA_FLAGS+=--xla_gpu_enable_triton_gemm=false (cuBLAS for every GEMM)
#   no_cmd_buffer    XLA_FLAGS+=--xla_gpu_enable_command_buffer= (no CUDA graphs)
#   einsum_dropout   RESEARCH_CUDNN_ATTENTION_DROPOUT=0: attention dropout on the einsum kernel
#   cudnn_in_graphs  XLA_FLAGS+=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN
#                    (cuDNN's kernels in CUDA graphs, as XLA's defaults; attention dropout then
#                    stays on the einsum kernel: cuDNN's dropout aborted there on JAX 0.11.2)
# Logs: OUT/NAME.VARIANT.log. --probe runs experiments/cudnn_dropout_probe.py first (whether
# cuDNN's fused attention dropout runs on this GPU, under which flags).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="" OUT="runs/gpu_benchmark" PROFILE=0 ONLY="" TESTS=0 VARIANTS="" PEERS=1 PROBE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS="$2"; shift 2 ;;
    --no_peers) PEERS=0; shift ;;
    --probe) PROBE=1; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --tests) TESTS=1; shift ;;
    *) echo "error: unknown argument '$1'; use --wheels DIR, --out DIR, --profile, --tests, --only NAME," \
            "--variants V1,V2, --no_peers, --probe" >&2
       exit 2 ;;
  esac
done
# variant -> "gin bindings|XLA flags|environment"
declare -A VARIANT_ARGS=(
  [default]="||"
  [guard_cond]="--gin.update_guard.kind='cond'||"
  [scan]="--gin.TransformerConfig.scan_layers=True||"
  [dropout16]="--gin.TransformerConfig.dropout_bits=16||"
  [no_triton_gemm]="|--xla_gpu_enable_triton_gemm=false|"
  [no_cmd_buffer]="|--xla_gpu_enable_command_buffer=|"
  [einsum_dropout]="||RESEARCH_CUDNN_ATTENTION_DROPOUT=0"
  [cudnn_in_graphs]="|--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN|"
)
IFS=, read -r -a VARIANT_LIST <<<"$VARIANTS"
for v in "${VARIANT_LIST[@]}"; do
  [ -n "${VARIANT_ARGS[$v]:-}" ] || {
    echo "error: --variants: $v is not one of: ${!VARIANT_ARGS[*]}" >&2; exit 2; }
done
PY="${PYTHON:-python3}"

if [ -n "$WHEELS" ]; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: --wheels $WHEELS holds no .whl files; pass the folder with the downloaded wheels" >&2
    exit 2
  fi
  SITE="$(mktemp -d /tmp/research-wheels.XXXXXX)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl || { echo "error: could not install the wheels in $WHEELS" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import gin, tensorflow_datasets, jax, flax, optax, orbax.checkpoint, torch, transformers" 2>/dev/null; then
  echo "error: $PY lacks one of gin-config, tensorflow-datasets, jax, flax, optax, orbax-checkpoint," \
       "torch, transformers; pass --wheels DIR with the missing ones as .whl files" >&2
  exit 2
fi
mkdir -p "$OUT"
"$PY" -c "import jax; d = jax.devices()[0]; print(f'JAX {jax.__version__} on {d.device_kind} ({d.platform})')"

if [ "$PROBE" = 1 ]; then
  "$PY" experiments/cudnn_dropout_probe.py
fi

if [ "$TESTS" = 1 ]; then
  # tests/conftest.py defaults JAX to the CPU; these tests need the GPU
  JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" timeout 300 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_attention_backends.py tests/test_precision_attention.py \
    -k "matches_einsum or matches_xla or lengths_match" 2>&1 | tail -n 15
fi

GPT_VOCAB=(--gin.TransformerConfig.vocab_size=50304)
BERT_VOCAB=(--gin.TransformerConfig.vocab_size=30522)
declare -A CASES=(
  [gpt_small]="--gin_file=configs/models/gpt_small.gin --gin_file=configs/runs/pretrain_causal.gin --gin.BATCH_SIZE=16 --gin.SEQ_LEN=1024 ${GPT_VOCAB[*]}"
  [gpt_medium]="--gin_file=configs/models/gpt_medium.gin --gin_file=configs/runs/pretrain_causal.gin --gin.BATCH_SIZE=16 --gin.SEQ_LEN=1024 ${GPT_VOCAB[*]}"
  [gpt_medium_nodropout]="--gin_file=configs/models/gpt_medium.gin --gin_file=configs/runs/pretrain_causal.gin --gin.BATCH_SIZE=16 --gin.SEQ_LEN=1024 ${GPT_VOCAB[*]} --gin.TransformerConfig.dropout_rate=0.0"
  [bert_base]="--gin_file=configs/models/bert_base.gin --gin_file=configs/runs/pretrain_mlm_nsp.gin --gin.BATCH_SIZE=32 --gin.SEQ_LEN=512 ${BERT_VOCAB[*]}"
)
ORDER=(gpt_medium bert_base gpt_small)
if [ -n "$ONLY" ]; then
  [ -n "${CASES[$ONLY]:-}" ] || { echo "error: --only $ONLY is not one of: ${!CASES[*]}" >&2; exit 2; }
  ORDER=("$ONLY")
fi

RUN_ENV=()  # environment assignments for the next run_case (a variant's)
run_case() {  # NAME LOG [extra args...]: one research.benchmark run, its JSON and a summary line
  local name="$1" log="$2"; shift 2
  # shellcheck disable=SC2086
  local args=(${CASES[$name]} --steps 10 --warmup 3 "$@")
  local start rc
  start=$(date +%s)
  env "${RUN_ENV[@]}" timeout 300 "$PY" -m research.benchmark "${args[@]}" >"$log" 2>&1
  rc=$?
  grep '^{' "$log" | tail -n 1 >"${log%.log}.json"
  echo "$(basename "${log%.log}"): exit $rc in $(( $(date +%s) - start )) s;" \
       "$(grep -E '^(compile time|step time|MFU|ours / )' "$log" | tr -s ' ' | tr '\n' ' ')"
  [ "$rc" = 0 ] || tail -n 5 "$log"
}

if [ -n "$VARIANTS" ]; then
  for name in "${ORDER[@]}"; do
    for v in "${VARIANT_LIST[@]}"; do
      IFS='|' read -r gin_args xla env_args <<<"${VARIANT_ARGS[$v]}"
      peers=()
      [ "$PEERS" = 1 ] && peers=(--compare=hf_torch,hf_torch_compile)
      RUN_ENV=(XLA_FLAGS="${XLA_FLAGS:-}${xla:+ $xla}")
      [ -n "$env_args" ] && RUN_ENV+=("$env_args")
      # shellcheck disable=SC2086
      run_case "$name" "$OUT/$name.$v.log" $gin_args "${peers[@]}"
    done
  done
  exit 0
fi

for name in "${ORDER[@]}"; do
  extra=()
  [ "$PEERS" = 1 ] && extra+=(--compare=hf_torch,hf_torch_compile)
  if [ "$PROFILE" = 1 ]; then
    extra+=(--profile_steps=5:7 --profile_dir="$OUT/$name.profile")
  fi
  run_case "$name" "$OUT/$name.log" "${extra[@]}"
  if [ "$PROFILE" = 1 ] && [ -d "$OUT/$name.profile" ]; then
    "$PY" -m research.trace_summary "$OUT/$name.profile" --top 12
  fi
done

"$PY" -m research.benchmark_table "$OUT" "${ORDER[@]}"
