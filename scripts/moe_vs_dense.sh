#!/usr/bin/env bash
# The report's MoE claim in miniature (issue 25): a dense Phi-3 and a PhiMoE with the same ACTIVE parameters
# (4 experts of half the dense FFN width, top-2) trained on the same TinyStories token stream (same shards, phases
# and seed) for the same wall time, side by side on the 2 cores (one core and one thread each, so both runs see the
# same machine), then scored on the same held-out stories (scripts/tinystories.sh's rule).
#
#   scripts/moe_vs_dense.sh                  # MINUTES=10 by default; needs runs/tinystories/{tok,ts_*} (tinystories.sh)
#   MINUTES=3 OUT=runs/mvd_quick scripts/moe_vs_dense.sh
#
# Writes OUT/{dense,moe}/ (runs, heldout.json, plots), OUT/summary.json and the figure (PNG=docs/img/moe_vs_dense.png
# for the one docs/moe.md shows).
set -euo pipefail
cd "$(dirname "$0")/.."
S=${SHARED:-../shared}/data/tinystories
T=${TS:-runs/tinystories}
R=${OUT:-runs/moe_vs_dense}
M=${MINUTES:-10}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
for d in tok ts_v1 ts_all ts_gpt4; do
  [ -e "$T/$d" ] || { echo "moe_vs_dense.sh: $T/$d is missing: run scripts/tinystories.sh first (or set TS)" >&2; exit 2; }
done
common=(--config recipes/tinystories.yaml --set threads=1 --set max_minutes="$M" --set eval_every=100000
        --set "sources={ts_v1: $T/ts_v1, ts_all: $T/ts_all, ts_gpt4: $T/ts_gpt4}"
        --set "heldout={data: $S/tinystories_10klines_chunk.txt.gz, docs: eot, last_docs: 87, ctx: 256}")
# The dense FFN is 512 wide; each expert 256, two active per token: the same active FFN parameters.
# Each run uses its faster setting. The MoE runs eager: on one core torch.compile took 110 s for its first step (the
# expert split is data-dependent) and then gave 783 vs 698 tokens/s, which does not repay itself in 10 minutes.
OMP_NUM_THREADS=1 taskset -c 0 $PY -m phiforge.train.pretrain "${common[@]}" --out "$R/dense" > "$R.dense.log" 2>&1 &
dense=$!
OMP_NUM_THREADS=1 taskset -c 1 $PY -m phiforge.train.pretrain "${common[@]}" --out "$R/moe" --set model=tiny-moe --set compile=false \
  --set "model_args={vocab_size: 4096, hidden_size: 256, intermediate_size: 256, num_hidden_layers: 6,
         num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 256,
         original_max_position_embeddings: 256, num_local_experts: 4}" > "$R.moe.log" 2>&1 &
moe=$!
mkdir -p "$R"
wait $dense $moe
for v in dense moe; do
  $PY -m phiforge.perplexity "$R/$v/final" --data "$S/tinystories_10klines_chunk.txt.gz" --docs eot --last-docs 87 \
    --rolling --ctx 256 --json "$R/$v/heldout.json" --threads 1
  $PY -m phiforge.train.plot "$R/$v" > /dev/null
done
$PY scripts/moe_vs_dense_report.py "$R" "${PNG:-$R/moe_vs_dense.png}"
