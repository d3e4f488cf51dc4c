"""lorastack.serve: the gateway in front of a supervised vLLM server (README: Serving)."""
