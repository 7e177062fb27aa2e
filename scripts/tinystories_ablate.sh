#!/bin/bash
# The ablation rows of docs/pretrain.md §6: one run each, MINUTES (10) on one core (CPU, default 0), one thread,
# the recipe otherwise unchanged. Needs the shards scripts/tinystories.sh makes; rows land in $R/ablation.txt.
cd "$(dirname "$0")/.."
R=${OUT:-runs/tinystories}   # the shards of scripts/tinystories.sh
PATH=$PWD/.venv/bin:$PATH     # make's venv, when there is one
SRC="{ts_v1: $R/ts_v1, ts_all: $R/ts_all, ts_gpt4: $R/ts_gpt4}"
M='vocab_size: 4096, hidden_size: 256, intermediate_size: 512, num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 256, original_max_position_embeddings: 256'
row() { name=$1; shift
  taskset -c ${CPU:-0} phiforge pretrain --config recipes/tinystories.yaml --out $R/abl_$name --set "sources=$SRC" \
    --set threads=1 --set max_minutes=${MINUTES:-10} --set export=false "$@" > $R/abl_$name.log 2>&1
  echo "$name: $(grep heldout_bpb $R/abl_$name/metrics.jsonl | tail -1)" >> $R/ablation.txt
}
row main
row no_phase2 --set 'phases=[{name: broad, weights: {ts_v1: 0.5, ts_all: 0.15, ts_gpt4: 0.35}}]'
row down_4layers --set "model_args={$M, num_hidden_layers: 4}"
row up_8layers --set "model_args={$M, num_hidden_layers: 8}"
