"""What a run leaves behind: TensorBoard logs, metrics.jsonl, a PNG of the curves, a summary."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from lorastack.adapters.fsutil import atomic_write_text


class RunLogger:
    """Scalars to TensorBoard (run_dir/tensorboard) and to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint (they will be logged again), and
        a last line a crash cut short."""
        if not self.jsonl.is_file():
            return
        keep = [json.dumps(row) for row in _rows(self.jsonl.read_text()) if row["step"] <= step]
        atomic_write_text(self.jsonl, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return _rows(path.read_text())


def _rows(text: str) -> list[dict]:
    """metrics.jsonl's rows; a line a crash or a full disk cut short is skipped."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """`fig`, laid out, as a PNG at `path` written atomically (never half a file), then closed."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    pyplot().close(fig)
    return path


def plot_curves(run_dir: Path, metric: str, title: str) -> Path:
    """training.png: training and validation loss, and the selection metric, by step."""
    plt = pyplot()
    rows = read_metrics(run_dir)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val = [r for r in rows if "validation/loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        steps, losses = zip(*train)
        ax1.plot(steps, losses, color="#9bb7d4", lw=1, label="train (per step)")
        smooth = _ema(losses, 0.9)
        ax1.plot(steps, smooth, color="#1f5fa8", lw=2, label="train (smoothed)")
    sample = [r for r in rows if "train_sample/loss" in r]
    if val:
        ax1.plot([r["step"] for r in val], [r["validation/loss"] for r in val], "o-",
                 color="#d9480f", label="validation")
        key = f"validation/{metric}"
        ax2.plot([r["step"] for r in val], [r.get(key, float("nan")) for r in val], "o-",
                 color="#2b8a3e", label="validation")
    if sample:  # the overfitting watch: a train sample evaluated exactly as validation
        ax1.plot([r["step"] for r in sample], [r["train_sample/loss"] for r in sample], "s--",
                 color="#1f5fa8", label="train sample (as validation)")
        ax2.plot([r["step"] for r in sample],
                 [r.get(f"train_sample/{metric}", float("nan")) for r in sample], "s--",
                 color="#1f5fa8", label="train sample")
        ax2.legend(frameon=False)
    ax1.set(xlabel="optimizer step", ylabel="answer-token loss", title="loss")
    ax1.legend(frameon=False)
    ax2.set(xlabel="optimizer step", ylabel=metric,
            title=f"{metric}: validation" + (" vs train sample" if sample else ""))
    ax2.grid(alpha=0.3)
    ax1.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, run_dir / "training.png")


def _ema(values, beta: float) -> list[float]:
    """Exponential moving average with bias correction (no pull toward the first value)."""
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** t))
    return out


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, else peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"adapter {summary['name']} ({summary['task']})")
    table.add_column("")
    table.add_column("validation", justify="right")
    table.add_column("test", justify="right")
    val, test = summary["metrics"].get("validation", {}), summary["metrics"].get("test", {})
    for key in sorted(set(val) | set(test)):
        if isinstance(val.get(key, test.get(key)), (int, float)):
            table.add_row(key, _fmt(val.get(key)), _fmt(test.get(key)))
    for label in val.get("per_class", {}):
        table.add_row(f"f1 {label}", _fmt(val["per_class"][label]["f1"]),
                      _fmt(test.get("per_class", {}).get(label, {}).get("f1")))
    for key, label in (("wall_seconds", "wall time (s)"), ("train_seconds", "training (s)"),
                       ("tokens_per_second", "tokens/s (real, training)"),
                       ("peak_memory_mb", "peak memory (MB)"), ("steps", "optimizer steps"),
                       ("best_step", "best step (restored)")):
        table.add_row(label, _fmt(summary.get(key)), "")
    Console(stderr=True).print(table)


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) and abs(value) < 100 else f"{value:,.0f}" \
        if isinstance(value, (int, float)) else str(value)
