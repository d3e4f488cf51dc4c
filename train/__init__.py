"""lorastack.train: LoRA/QLoRA adapters from a config, and the example data catalog."""
