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

# Idle OpenMP workers spin for about 0.1 ms (10,000 spins; libgomp's default is 3 ms, PASSIVE is none) before
# they sleep, unless the user chose a policy. A decode step opens one parallel region per large op a few
# microseconds apart: workers that sleep between them pay a futex wake-up each time (the 16-layer demo model
# decodes 3x slower with OMP_WAIT_POLICY=PASSIVE, SmolLM2 1.5x), while workers that spin for long steal the
# cores other processes need. Under contention the engine runs on the free cores only (engine.free_cores).
# libgomp reads these variables when it loads, i.e. with torch: they take effect when layerskip_ext is imported
# first.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

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
