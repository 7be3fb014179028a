#!/usr/bin/env bash
# Installs everything, then generates with the default model (SmolLM2-135M-Instruct): autoregressive, then
# self-speculative (identical text, with its acceptance rate), then a short streamed chat in the model's own chat
# template; then self-speculative on the LayerSkip demo
# checkpoint (checkpoints/layerskip-demo), whose early layers were trained to draft.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
DEMO_CKPT="$PWD/checkpoints/layerskip-demo"
cd /tmp  # import the installed package, not the source tree
# no prompt: generate asks for a short story in the model's own chat template (from the GGUF metadata)
echo "=== SmolLM2-135M-Instruct, autoregressive"
"$PY" -m layerskip_ext.cli generate --strategy autoregressive --max-new-tokens 128
echo; echo "=== SmolLM2-135M-Instruct, self-speculative (exit layer 24, 3 drafts per round)"
"$PY" -m layerskip_ext.cli generate --strategy self_speculative --exit-layer 24 --num-speculations 3 \
  --max-new-tokens 128
echo; echo "=== SmolLM2-135M-Instruct, chat (two turns piped into the streaming REPL)"
printf 'What is a lighthouse?\nWho keeps it?\n' | "$PY" -m layerskip_ext.cli chat --strategy autoregressive \
  --max-new-tokens 96 --verbose
echo; echo "=== LayerSkip demo checkpoint, self-speculative (exit layer 3 of 8, 2 drafts per round)"
"$PY" -m layerskip_ext.cli generate "It is a truth universally acknowledged, that" --model "$DEMO_CKPT" \
  --strategy self_speculative --exit-layer 3 --num-speculations 2 --max-new-tokens 128
echo; echo "=== LayerSkip demo checkpoint, every strategy (median of 3 runs)"
"$PY" -m layerskip_ext.cli bench --model "$DEMO_CKPT" --exit-layer 3 --num-speculations 2 --max-new-tokens 128 \
  --prompt "It is a truth universally acknowledged, that"
