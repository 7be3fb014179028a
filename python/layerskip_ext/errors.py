"""The exceptions layerskip_ext raises for bad input: one small hierarchy, all ValueErrors.

    LayerSkipError(ValueError)          a bad argument to a public call (generate, load, the ops' wrappers)
    ├── ConfigError                     a model configuration value out of range or of the wrong type (.field)
    └── CheckpointError                 a checkpoint file that cannot be used (.path, .field): bad JSON, a config
                                        or tokenizer that does not parse, corrupt tensors, a shard outside the
                                        model directory

Other exceptions keep their usual meaning: FileNotFoundError for a path that does not exist, TypeError for
an object of the wrong kind (a model that is not a LayerSkipModel, a callback that is not callable),
RuntimeError from the C++ ops for what only shows while running (non-finite logits from broken weights).
Everything is a subclass of ValueError, so `except ValueError` keeps catching all of them.
"""
from __future__ import annotations


class LayerSkipError(ValueError):
    """A bad argument or bad input; the message names the argument and the accepted range."""


class ConfigError(LayerSkipError):
    """A model configuration value out of range or of the wrong type; `field` names it (config.json key)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CheckpointError(LayerSkipError):
    """A checkpoint that cannot be used; `path` is the file, `field` the key or tensor when one is at fault."""

    def __init__(self, message: str, path: str | None = None, field: str | None = None):
        super().__init__(message)
        self.path, self.field = path, field
