#!/usr/bin/env bash
# The post-training end-to-end run of docs/posttrain.md on a 2-core CPU (about an hour on idle cores): a ~9M-parameter
# Phi-3-architecture model, bf16 autocast, SFT on the Alpaca files of ../shared/data/sft (short answers; LIMA and the
# AlpacaEval GPT-4 outputs run to hundreds of tokens, and a model this small loops on them), DPO on the preference data.
# Numbers land in OUT/sft/eval.json and OUT/dpo/eval.json.
set -euo pipefail
SHARED=${SHARED:-../shared}
export OUT=${OUT:-runs/posttrain_cpu} DTYPE=${DTYPE:-bf16} MODEL=${MODEL:-small-20m}
export MODEL_ARGS=${MODEL_ARGS:-"hidden_size: 256, intermediate_size: 768, num_hidden_layers: 6, num_attention_heads: 4, num_key_value_heads: 4"}
export PRETRAIN_STEPS=${PRETRAIN_STEPS:-600} PRETRAIN_BATCH=${PRETRAIN_BATCH:-16}
export SFT_STEPS=${SFT_STEPS:-900} SFT_BATCH=${SFT_BATCH:-8} SFT_SEQ=${SFT_SEQ:-1024} SFT_LR=${SFT_LR:-5e-4}
export SFT_DATA=${SFT_DATA:-"$SHARED/data/sft/alpaca_5000_subset.json $SHARED/data/sft/alpaca_en_demo.json"}
export DPO_STEPS=${DPO_STEPS:-500} DPO_BATCH=${DPO_BATCH:-8} DPO_SEQ=${DPO_SEQ:-1024} DPO_LR=${DPO_LR:-2e-5}
exec "$(dirname "$0")/posttrain_tiny.sh"
