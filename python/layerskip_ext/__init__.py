"""layerskip_ext: LayerSkip early-exit training and lossless self-speculative decoding.

    import layerskip_ext
    model = layerskip_ext.load()                      # SmolLM2-135M-Instruct, or a HF directory / .gguf
    result = layerskip_ext.generate(model, "Once upon a time", max_new_tokens=64,
                                    strategy="self_speculative", exit_layer=8, num_speculations=4)
    print(result.text, result.stats.tokens_per_second, result.stats.acceptance_rate)
    reply = layerskip_ext.chat(model, [{"role": "user", "content": "Hi"}], stop=["\n\n"])  # the model's template
    for piece in layerskip_ext.stream(model, "Once upon a time", max_new_tokens=64):  # text as it is accepted
        print(piece, end="")
"""
import os

# Idle OpenMP workers sleep instead of spinning unless the user chose otherwise: spinning workers collapse when
# other processes share the cores (issue 13). libgomp reads this when it loads, i.e. with torch: it takes effect
# when layerskip_ext is imported first. OMP_WAIT_POLICY=ACTIVE restores spinning for exclusive-use runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402,F401  (loads libtorch before the extension)

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, LayerSkipError
from .generation import GenerationResult, GenerationStats
from .model import LayerSkipModel, load
from .api import generate
from .chat import apply_chat_template, chat
from .streaming import stream

__all__ = ["ModelConfig", "LayerSkipError", "ConfigError", "CheckpointError", "GenerationResult", "GenerationStats",
           "LayerSkipModel", "load", "generate", "chat", "apply_chat_template", "stream"]
