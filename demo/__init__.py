"""lorastack.demo: the Gradio page (app: build_page; tabs: one builder per tab; inputs, feedback,
models, answers: their logic, without Gradio); talks to the gateway over HTTP only."""
