#!/usr/bin/env bash
# Installs everything, then generates with the default model (SmolLM2-135M-Instruct): autoregressive, then
# self-speculative (identical text, with its acceptance rate), then a short streamed chat in the model's own chat
# template. Second act: the 16-layer LayerSkip code model (checkpoints/layerskip-code16, trained with the LayerSkip
# recipe so that its early layers draft), self-speculative at the settings tuned for it and stored beside it
# (layerskip_settings.json), then every strategy side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
DEMO_CKPT="$PWD/checkpoints/layerskip-code16"
CODE_PROMPT=$'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n'  # Python, as it was trained on
cd /tmp  # import the installed package, not the source tree
# no prompt: generate asks for a short story in the model's own chat template (from the GGUF metadata)
echo "=== SmolLM2-135M-Instruct, autoregressive"
"$PY" -m layerskip_ext.cli generate --strategy autoregressive --max-new-tokens 128
# SmolLM2 is not LayerSkip-trained: its layer 24 agrees with the last layer ~15% of the time, so fixed drafting
# runs at ~0.4x; the adaptive policy (csrc/engine/draft_policy.h) stops drafting when it does not pay
echo; echo "=== SmolLM2-135M-Instruct, self-speculative (exit layer 24, up to 3 drafts, adaptive drafting)"
"$PY" -m layerskip_ext.cli generate --strategy self_speculative --exit-layer 24 --num-speculations 3 \
  --adaptive --draft-threshold 0.6 --max-new-tokens 128
echo; echo "=== SmolLM2-135M-Instruct, chat (two turns piped into the streaming REPL)"
printf 'What is a lighthouse?\nWho keeps it?\n' | "$PY" -m layerskip_ext.cli chat --strategy autoregressive \
  --max-new-tokens 96 --verbose
echo; echo "=== LayerSkip code model (16 layers), self-speculative at its tuned settings (layerskip_settings.json)"
"$PY" -m layerskip_ext.cli generate "$CODE_PROMPT" --model "$DEMO_CKPT" --strategy self_speculative \
  --max-new-tokens 128 --threads 2
echo; echo "=== LayerSkip code model, every strategy (median of 5 runs; self-speculative at the tuned settings)"
"$PY" -m layerskip_ext.cli bench --model "$DEMO_CKPT" --max-new-tokens 128 --repeats 5 --threads 2 \
  --prompt "$CODE_PROMPT"
