"""lorastack.train: LoRA/QLoRA adapters from a config, and the example data catalog.

    from lorastack.train import train, TrainConfig
    result = train("reviews-classify")          # a shipped config, a YAML path, a dict or a TrainConfig
    result.adapter_dir, result.metrics["test"]

Importing this package is light: torch loads when training starts.
"""

from lorastack.train import quiet
from lorastack.train.config import TrainConfig, load_config
from lorastack.train.run import TrainResult, train

quiet.install()  # before anything imports bitsandbytes: its CPU kernel warning is noise here

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
