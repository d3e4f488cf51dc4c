"""`lorastack train --nproc N`: 2 gloo processes on CPU against 1 process, on the tiny model.

Tolerances. N processes compute the global batch's gradient as 1 process does (each shard's
loss scaled by its share of the batch's loss weight, answer tokens x class weight; gradients
summed), so what differs is float rounding: shard gradients summed by the all-reduce instead of
inside one batched matmul, 1 thread per process instead of 2, each shard padded to its own
length; ~1e-7 relative.
- The gradient (the first step's, read from the step-1 checkpoint: Adam's first moment is then
  0.1 x the clipped gradient): max |g1 - g2| <= GRAD_TOLERANCE x max |g1|.
- The trained adapter: Adam divides each gradient by its own magnitude, so a component whose
  gradient is ~0 (cancellation) turns rounding noise into a fraction of a full step (lr) on
  that one weight; measured here after 6 steps: 2 of 8192 weights off by 0.04 x lr, all others
  within 2e-5 x lr. Bounds: ||a - b|| <= ADAPTER_TOLERANCE x ||a|| (Frobenius, whole adapter;
  measured 6e-5) and max |a - b| <= lr / 2 (less than one optimizer step on any weight).
- Train losses per step: within 1e-5 relative.
LoRA dropout is off here: with dropout the processes draw their own masks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorastack.adapters.store import AdapterStore
from lorastack.commands import app
from lorastack.train import distributed, train

GRAD_TOLERANCE = 1e-5  # of the largest gradient component
ADAPTER_TOLERANCE = 1e-3  # of the adapter's norm
runner = CliRunner()


@pytest.fixture
def dp_config(tiny_config, review_files, tmp_path):
    """Uneven shards (batch 5 over 2 processes, a short last batch), gradient accumulation,
    class weights on imbalanced data (36 examples, 2 of 3 positive), no dropout."""
    rows = [json.loads(line) for line in review_files["train"].read_text().splitlines()]
    negatives = [r for r in rows if r["sentiment"] == "negative"][:12]
    train_path = tmp_path / "imbalanced.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in
                                  [r for r in rows if r["sentiment"] == "positive"] + negatives))
    cfg = json.loads(json.dumps(tiny_config))
    cfg["data"]["source"] = str(train_path)
    cfg["task"].update(balance="weights")
    cfg["lora"]["dropout"] = 0.0
    cfg["training"].update(batch_size=5, grad_accum=2, keep_checkpoints=10)
    return cfg


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`lorastack ...` as a user runs it, in its own process (torchrun needs a real one)."""
    return subprocess.run([sys.executable, "-m", "lorastack", *args], check=False,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def _adapter(store: str, name: str):
    return load_file(AdapterStore(store).resolve(name).path / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    return diff, scale


def _norm_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors together."""
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    return (num / sum(float((a[k] ** 2).sum()) for k in a)) ** 0.5


def _assert_same_adapter(a: dict, b: dict, lr: float) -> None:
    diff, _ = _max_diff(a, b)
    rel = _norm_diff(a, b)
    print(f"adapter: ||a - b|| / ||a|| = {rel:.3g}, max |a - b| = {diff:.3g} "
          f"({diff / lr:.3g} x lr)")
    assert rel <= ADAPTER_TOLERANCE and diff <= lr / 2, (rel, diff)


def _losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def test_two_processes_train_what_one_does_and_only_rank_0_writes(dp_config, tmp_path):
    dp_config["training"]["save_every"] = 1
    one = train(dict(dp_config, name="one"))
    started = time.monotonic()
    run = _cli("train", _write(tmp_path, dp_config), "--nproc", "2", "--set", "name=two")
    assert run.returncode == 0, run.stdout + run.stderr
    print(f"2-process run: {time.monotonic() - started:.1f} s")
    assert "adapter two written to" in run.stdout
    assert "data parallel: 2 processes, each up to 3 of every global batch of 5" in run.stdout
    two_dir = tmp_path / "runs" / "two"
    # (a) the same gradient, within float rounding; the same adapter, within Adam's rounding
    g1, g2 = (load_file(run_dir / "checkpoints" / "step-0000001" / "optimizer.safetensors")
              for run_dir in (one.run_dir, two_dir))
    g1 = {k: v for k, v in g1.items() if k.endswith(".exp_avg")}
    diff, scale = _max_diff(g1, {k: g2[k] for k in g1})
    print(f"step-1 gradient: max |g1 - g2| = {diff:.3g} ({diff / scale:.3g} of max |g1|)")
    assert g1 and diff <= GRAD_TOLERANCE * scale, (diff, scale)
    a, b = _adapter(dp_config["store"], "one"), _adapter(dp_config["store"], "two")
    _assert_same_adapter(a, b, dp_config["training"]["lr"])
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)  # B starts at 0
    assert moved > 2 * dp_config["training"]["lr"]  # the weights moved by several steps
    # the same losses, steps and schedule, each step logged once (rank 0 alone logs)
    l1, l2 = _losses(one.run_dir), _losses(two_dir)
    assert [s for s, _ in l2] == [1, 2, 3, 4, 5, 6] == [s for s, _ in l1]
    assert all(abs(x - y) <= 1e-5 * abs(x) for (_, x), (_, y) in zip(l1, l2, strict=True))
    summary = json.loads((two_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert summary["tokens"] == one.summary["tokens"]  # tokens counted over both processes
    # (c) one voice, one writer: a single progress bar and evaluation report, one adapter in
    # the store, no partial files anywhere
    assert run.stdout.count("step 3: validation") == 1
    assert (run.stderr + run.stdout).count("training:   0%|") == 1  # one bar started
    assert AdapterStore(dp_config["store"]).names() == ["one", "two"]
    leftovers = [p for p in (tmp_path / "store").rglob("*") if ".partial" in p.name
                 or p.name.endswith(".tmp")]
    leftovers += [p for p in two_dir.rglob("*") if ".partial" in p.name
                  or p.name.endswith(".tmp")]
    assert leftovers == []
    ckpts = sorted(p.name for p in (two_dir / "checkpoints").iterdir())
    assert ckpts == [f"step-{i:07d}" for i in range(1, 7)]
    # the checkpoint carries both processes' random streams; its optimizer moments are the
    # 1-process run's
    o1 = load_file(one.run_dir / "checkpoints" / "step-0000006" / "optimizer.safetensors")
    o2 = load_file(two_dir / "checkpoints" / "step-0000006" / "optimizer.safetensors")
    assert "rng.torch.rank1" in o2 and "rng.torch.rank1" not in o1
    moments = {k: v for k, v in o1.items() if k.endswith("exp_avg")}
    assert moments and _norm_diff(moments, {k: o2[k] for k in moments}) <= ADAPTER_TOLERANCE


def test_checkpoints_resume_across_process_counts(dp_config, tmp_path, crash_at):
    train(dict(dp_config, name="reference"))
    cfg = dict(dp_config, name="switch")

    with pytest.raises(crash_at.error):  # 1 process to step 3, checkpoint at step 2
        train(cfg, on_step=crash_at(3))
    run_dir = tmp_path / "runs" / "switch"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002"]
    # 1 -> 2 processes
    resumed = _cli("train", _write(tmp_path, cfg), "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step-0000002: step 2/6, epoch 0, in 2 processes" in resumed.stdout
    ref, lr = _adapter(dp_config["store"], "reference"), dp_config["training"]["lr"]
    _assert_same_adapter(ref, _adapter(dp_config["store"], "switch"), lr)
    assert [s for s, _ in _losses(run_dir)] == [1, 2, 3, 4, 5, 6]
    # 2 -> 1 process: drop the last checkpoint, resume from step 4 (written by 2 processes)
    shutil.rmtree(run_dir / "checkpoints" / "step-0000006")
    AdapterStore(dp_config["store"]).remove("switch")
    steps = []
    train(cfg, resume=True, on_step=lambda s: steps.append(s.step))
    assert steps == [5, 6]
    _assert_same_adapter(ref, _adapter(dp_config["store"], "switch"), lr)


def _evaluations(run_dir) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["validation/loss"], r["validation/accuracy"])
            for r in rows if "validation/loss" in r]


def test_fsdp_shards_the_base_and_trains_what_one_process_does(dp_config, tmp_path):
    """--fsdp: each of 2 processes holds half of the base's weights, the adapter is the
    1-process one within the data-parallel tolerances (the last batch of 1 leaves rank 1 an
    empty shard, which it runs along at weight 0; gradient checkpointing recomputes each layer,
    gathered again, in backward), validation runs on both in step, and its checkpoints resume
    in 1 unsharded process."""
    one = train(dict(dp_config, name="one"))
    run = _cli("train", _write(tmp_path, dp_config), "--nproc", "2", "--fsdp",
               "--set", "name=sharded", "--set", "training.gradient_checkpointing=true")
    assert run.returncode == 0, run.stdout + run.stderr
    said = next(line for line in run.stdout.splitlines() if line.startswith("fsdp:"))
    print(said)
    held, total = (float(x) for x in re.search(r"holds ([\d.]+) of ([\d.]+) MiB", said).groups())
    assert "sharded over 2 processes in 3 units" in said  # 2 decoder layers, then the rest
    assert abs(held - total / 2) <= 0.01 * total, (held, total)
    lr, store = dp_config["training"]["lr"], dp_config["store"]
    _assert_same_adapter(_adapter(store, "one"), _adapter(store, "sharded"), lr)
    run_dir = tmp_path / "runs" / "sharded"
    l1, l2 = _losses(one.run_dir), _losses(run_dir)
    assert [s for s, _ in l2] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x - y) <= 1e-5 * abs(x) for (_, x), (_, y) in zip(l1, l2, strict=True))
    e1, e2 = _evaluations(one.run_dir), _evaluations(run_dir)
    assert [e[0] for e in e2] == [3, 6] == [e[0] for e in e1]
    assert all(abs(a[1] - b[1]) <= 1e-4 * abs(a[1]) and a[2] == b[2]
               for a, b in zip(e1, e2, strict=True)), (e1, e2)
    # the manifest's metrics come from rank 0's fresh unsharded base, as for 1 process
    m1 = AdapterStore(store).resolve("one").manifest.metrics.test
    m2 = AdapterStore(store).resolve("sharded").manifest.metrics.test
    assert abs(m1["loss"] - m2["loss"]) <= 1e-4 * m1["loss"] and m1["accuracy"] == m2["accuracy"]
    # a sharded run's checkpoint, resumed by 1 process without sharding
    shutil.rmtree(run_dir / "checkpoints" / "step-0000006")
    AdapterStore(store).remove("sharded")
    steps = []
    same = dict(dp_config, name="sharded",
                training={**dp_config["training"], "gradient_checkpointing": True})
    train(same, resume=True, on_step=lambda s: steps.append(s.step))
    assert steps == [5, 6]
    _assert_same_adapter(_adapter(store, "one"), _adapter(store, "sharded"), lr)


def test_fsdp_needs_several_processes_and_a_float_base_on_cpu(tiny_config, tmp_path):
    alone = runner.invoke(app, ["train", _write(tmp_path, tiny_config), "--fsdp"])
    assert alone.exit_code == 1
    assert "--fsdp shards the base over several processes: give --nproc N with N >= 2" in \
        " ".join(alone.output.split())
    cfg = dict(tiny_config, quantization="4bit")
    run = _cli("train", _write(tmp_path, cfg), "--nproc", "2", "--fsdp")
    assert run.returncode == 1
    assert "training.fsdp with quantization=4bit needs CUDA" in run.stderr, run.stderr
    assert not AdapterStore(tiny_config["store"]).names()


def test_nproc_errors_name_the_limit(tiny_config, tmp_path):
    path = _write(tmp_path, tiny_config)
    count, what = distributed.available_workers()
    cases = [(["--nproc", "0"],
              "--nproc 0: the number of training processes must be at least 1"),
             (["--nproc", str(count + 1)],
              (f"--nproc {count + 1}: this machine has {count} {what}, and each training "
               f"process needs one of its own; use --nproc {count} or fewer")),
             (["--nproc", "2", "--set", "training.batch_size=1"],
              ("training.batch_size=1 is the global batch, split over the processes: "
               "--nproc 2 needs it to be at least 2"))]
    for args, message in cases:
        result = runner.invoke(app, ["train", path, *args])
        assert result.exit_code == 1, result.output
        assert message in " ".join(result.stderr.split()), result.stderr
        assert "Traceback" not in result.output and not result.stdout
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_a_failing_process_ends_the_run_with_its_message(tmp_path, capfd):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import torch
        from lorastack.train import distributed

        dist = distributed.from_env()
        distributed.init(dist)
        if dist.rank == 1:
            raise SystemExit("rank 1 gave up: the data shard is unreadable")
        dist.all_reduce_sum(torch.ones(1))  # rank 0 waits here for a peer that is gone
        print("rank 0 finished")
    """))
    started = time.monotonic()
    status = distributed.launch(2, [str(script)])
    elapsed = time.monotonic() - started
    out, err = capfd.readouterr()
    assert status != 0 and elapsed < 60, (status, elapsed)
    assert "rank 1 gave up: the data shard is unreadable" in out + err
    assert ("error: training process 1 of 2 failed (exit status 1), its message is above; the "
            "other processes were stopped") in err
    assert "rank 0 finished" not in out


def test_early_stopping_ends_every_process_at_the_same_step(dp_config, tmp_path):
    """Rank 0 decides (patience 1, evaluating every step); the other process follows it out of
    the loop instead of waiting at the next all-reduce."""
    dp_config["training"].update(eval_every=1, early_stopping_patience=1)
    one = train(dict(dp_config, name="one"))
    assert one.summary["stopped_early"] and one.summary["steps"] < 6, one.summary
    run = _cli("train", _write(tmp_path, dp_config), "--nproc", "2", "--set", "name=two",
               timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"early stop at step {one.summary['steps']}" in run.stdout
    two = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert (two["steps"], two["best_step"], two["stopped_early"]) == (
        one.summary["steps"], one.summary["best_step"], True)
