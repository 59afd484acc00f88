"""tempflow_fast: time-aware GRPO for flow-matching text-to-image models, on fused kernels."""

__version__ = "0.1.0"

# The Python API, imported on first use so that `import tempflow_fast.ops` stays torch-only:
#   from tempflow_fast import Trainer, Config, TrainConfig
_API = {
    "Trainer": "tempflow_fast.training.trainer",
    "Config": "tempflow_fast.training.train_config",
    "ModelConfig": "tempflow_fast.training.train_config",
    "SamplingConfig": "tempflow_fast.training.train_config",
    "TrainConfig": "tempflow_fast.training.train_config",
    "LoraConfig": "tempflow_fast.training.train_config",
    "TempFlowConfig": "tempflow_fast.training.train_config",
    "FlowGRPOConfig": "tempflow_fast.training.train_config",
    "G2RPOConfig": "tempflow_fast.training.train_config",
    "StepwiseConfig": "tempflow_fast.training.train_config",
    "EvalConfig": "tempflow_fast.training.train_config",
    "LogConfig": "tempflow_fast.training.train_config",
    "DataConfig": "tempflow_fast.training.train_config",
    "CheckpointConfig": "tempflow_fast.training.train_config",
    "RewardConfig": "tempflow_fast.rewards.config",
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tempflow_fast' has no attribute {name!r}")
