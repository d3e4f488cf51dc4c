"""lorastack: train LoRA/QLoRA adapters and serve them hot-swapped behind vLLM.

The code lives in four subpackages, each its own top-level folder in the repository:
`lorastack.adapters` (the on-disk contract and the base-model catalog), `lorastack.train`,
`lorastack.serve` and `lorastack.demo`; `lorastack.client` is the gateway's Python client.
"""

__version__ = "0.1.0"
