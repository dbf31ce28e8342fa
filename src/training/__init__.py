"""Training (the paper's Algorithm 1) on Hugging Face Accelerate: config, trainer, checkpoints, logs."""

from .checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import TRAIN_MODES, DataConfig, EMAConfig, OptimConfig, TrainConfig
from .logs import TrainingLog, plot_training_log
from .mini import MiniRecipe, train_mini
from .runfolder import RunFolderLockedError, RunLock
from .trainer import NonFiniteLossError, NonFiniteWeightsError, Trainer, TrainResult, train

__all__ = [
    "TrainConfig",
    "DataConfig",
    "OptimConfig",
    "EMAConfig",
    "TRAIN_MODES",
    "Trainer",
    "TrainResult",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "RunFolderLockedError",
    "RunLock",
    "train",
    "MiniRecipe",
    "train_mini",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "TrainingLog",
    "plot_training_log",
]
