"""The gateway's answers as the page shows them (no Gradio): a prediction, Compare's two sides."""

from __future__ import annotations

import queue
import threading

from lorastack.client import Classified, Client, GatewayError


def prediction_markdown(models: list[str], answer: Classified) -> str:
    lines = [f"### Predicted: **{answer.label}** ({answer.confidence:.1%})",
             f"by `{' + '.join(models)}`" + (" (ensemble: the members' mean)"
                                              if len(models) > 1 else
                                              " (stored ensemble: its members' weighted mix)"
                                              if answer.members else "")]
    for name, member in (answer.members or {}).items():
        lines.append(f"- `{name}`: {member.label} ({member.confidence:.1%})")
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if lines[2:] else "")


def classify_side(client: Client, model: str, text: str, classifiers: list[str]):
    """(label probabilities, text) for one side of Compare; a generation model has no labels."""
    if model not in classifiers:
        return None, (f"{model} is not a classification adapter: it has no labels to score. "
                      f"Pick one of: {', '.join(classifiers) or 'none served'}")
    try:
        answer = client.classify([model], text)[0]
    except GatewayError as exc:
        if exc.status in (400, 404):
            return None, f"{model}: {exc}"
        raise
    return answer.probabilities, f"{model}: {answer.label} ({answer.confidence:.1%})"


def stream_pair(client: Client, models: tuple[str, str], prompt: str, params: dict):
    """Two chat generations at once; yields (text A, text B) whenever either grows."""
    events: queue.Queue = queue.Queue()

    def pump(side: int, model: str):
        try:
            for piece in client.stream_chat(model, prompt, **params):
                events.put((side, piece))
        except GatewayError as exc:
            events.put((side, f"\n[{exc}]"))
        finally:
            events.put((side, None))

    for side, model in enumerate(models):
        threading.Thread(target=pump, args=(side, model), daemon=True).start()
    texts, running = ["", ""], 2
    while running:
        side, piece = events.get()
        if piece is None:
            running -= 1
            continue
        texts[side] += piece
        yield texts[0], texts[1]
