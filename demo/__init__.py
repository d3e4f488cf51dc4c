"""lorastack.demo: the Gradio page; talks to the gateway over HTTP only."""
