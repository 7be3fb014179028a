"""layerskip_ext.training: LayerSkip training (layer dropout, early-exit loss, curricula), recipes and evaluation.

    from layerskip_ext.training import load_config, train
    train(load_config("training/configs/demo-layerskip.yaml", ["train.steps=100"]))
"""
from .config import TrainConfig, load_config
from .curriculum import EarlyExitCurriculum
from .early_exit_loss import early_exit_loss, loss_scales
from .layer_dropout import LayerDropout, layer_dropout_rates
from .model import LayerSkipLM, residual_states

__all__ = ["TrainConfig", "load_config", "EarlyExitCurriculum", "early_exit_loss", "loss_scales", "LayerDropout",
           "layer_dropout_rates", "LayerSkipLM", "residual_states", "train"]


def train(config, progress: bool = True):
    """Runs a training recipe (a TrainConfig): see trainer.train."""
    from .trainer import train as _train
    return _train(config, progress)
