"""The memory plan (train/plan.py): from the base's config alone, in milliseconds. Its numbers
against measured peaks are bench/memory_plan.py's job (tests/bench/test_memory_plan.py)."""

from __future__ import annotations

import pytest

from lorastack.train.config import build_config
from lorastack.train.plan import (
    Device,
    GiB,
    PlanError,
    Shape,
    parse_device,
    plan_memory,
)

CPU_BIG = Device("cpu", 64 * GiB, "cpu (64 GiB given)")


@pytest.fixture(scope="module")
def smol(base_model) -> Shape:
    return Shape.from_base(base_model.name)


def _cfg(**parts):
    return build_config({"data": {"max_length": 256},
                         "training": {"batch_size": 8, "grad_accum": 1}, **parts})


def test_shape_is_read_from_the_config(smol):
    assert (smol.hidden, smol.layers, smol.heads, smol.kv_heads) == (576, 30, 9, 3)
    assert smol.vocab == 49152 and smol.tied


def test_rows_sum_to_the_total_and_are_positive(smol):
    for quant in ("none", "8bit", "4bit"):
        plan = plan_memory(_cfg(quantization=quant), CPU_BIG, shape=smol)
        assert plan.total == sum(r.bytes for r in plan.rows)
        assert all(r.bytes > 0 and r.name for r in plan.rows), plan.rows
        assert plan.serving_total == sum(r.bytes for r in plan.serving) > 0


def test_quantization_shrinks_the_weights(smol):
    def weights(quant, device):
        plan = plan_memory(_cfg(quantization=quant), device, shape=smol)
        return sum(r.bytes for r in plan.rows if r.name.startswith("base weights"))

    cpu, gpu = CPU_BIG, Device("cuda", 24 * GiB, "cuda")
    assert weights("4bit", cpu) < weights("8bit", cpu) < weights("none", cpu)
    assert weights("4bit", gpu) < weights("8bit", gpu) < weights("none", gpu)
    assert weights("none", gpu) * 2 == weights("none", cpu)  # bf16 vs float32
    # NF4 with double quant: just over half a byte per linear weight
    linear = smol.layers * sum(a * b for a, b in smol.linear().values())
    assert 0.5 * linear < weights("4bit", cpu) < 0.53 * linear


def test_fsdp_on_gpus_keeps_one_share_of_the_weights_plus_what_it_gathers(smol):
    gpu = Device("cuda", 24 * GiB, "cuda")
    for quant in ("none", "4bit"):
        whole = plan_memory(_cfg(quantization=quant), gpu, shape=smol, processes=4)
        cfg = _cfg(quantization=quant, training={"batch_size": 8, "fsdp": True})
        rows = {r.name: r.bytes for r in plan_memory(cfg, gpu, shape=smol, processes=4).rows}
        for row in whole.rows:
            if row.name.startswith(("base weights", "embeddings")):
                assert rows[f"{row.name}, 1/4 (fsdp)"] == row.bytes // 4
            else:
                assert rows[row.name] == row.bytes
        layer = sum(a * b for a, b in smol.linear().values())
        assert rows["fsdp: gathered weights"] == int(
            smol.float_params() * (2 if quant == "none" else 4)
            + 2 * (layer * 2 if quant == "none" else
                   next(r.bytes for r in whole.rows if r.name.startswith("base weights"))
                   / smol.layers))
    # on CPU each process loads the whole base before sharding it: the plan stays whole
    cfg = _cfg(training={"batch_size": 8, "fsdp": True})
    assert plan_memory(cfg, CPU_BIG, shape=smol, processes=4).rows == \
        plan_memory(_cfg(), CPU_BIG, shape=smol, processes=4).rows


def test_quantized_keeps_embeddings_float(smol):
    plan = plan_memory(_cfg(quantization="4bit"), CPU_BIG, shape=smol)
    (emb,) = [r for r in plan.rows if r.name.startswith("embeddings")]
    assert emb.bytes == smol.float_params() * 4


def test_checkpointing_lowers_activations(smol):
    def activations(ckpt):
        plan = plan_memory(_cfg(), CPU_BIG, shape=smol, checkpointing=ckpt)
        return next(r.bytes for r in plan.rows if r.name == "activations"), plan.total

    (on, total_on), (off, total_off) = activations(True), activations(False)
    assert on * 5 < off and total_on < total_off


def test_activations_grow_with_batch_and_length(smol):
    def act(batch, length):
        cfg = build_config({"data": {"max_length": length}})
        plan = plan_memory(cfg, CPU_BIG, shape=smol, batch_size=batch, checkpointing=False)
        return next(r.bytes for r in plan.rows if r.name == "activations")

    assert act(8, 128) == pytest.approx(2 * act(4, 128)) == pytest.approx(2 * act(8, 64))


def test_fewer_adapted_layers_save_less(smol):
    top = _cfg(lora={"layers": list(range(15, 30))})
    half = plan_memory(top, CPU_BIG, shape=smol, checkpointing=False)
    every = plan_memory(_cfg(), CPU_BIG, shape=smol, checkpointing=False)
    assert half.total < every.total


def test_verdict_flips_with_the_device_size(smol):
    cfg = _cfg()
    need = plan_memory(cfg, CPU_BIG, shape=smol).total
    big = plan_memory(cfg, Device("cpu", need + 1, "big"), shape=smol)
    small = plan_memory(cfg, Device("cpu", need - 1, "small"), shape=smol)
    assert big.fits and big.verdict.startswith("fits")
    assert not small.fits and small.verdict.startswith("does not fit")


def test_parse_device():
    # the sizes training.memory_budget takes (config.parse_memory): GB = 10^9, GiB = 2^30
    assert parse_device("cuda:24GiB") == Device("cuda", 24 * GiB, "cuda (24.0 GiB given)")
    assert parse_device("cuda:24GB").total_bytes == 24 * 10**9
    assert parse_device("cpu:512MiB").total_bytes == 512 * 2**20
    ram = parse_device("cpu").total_bytes
    with open("/proc/meminfo", encoding="utf-8") as fh:
        kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
    assert abs(ram - kb * 1024) < 64 * 2**20
    for bad in ("gpu", "cuda:24", "cuda:0GB", "tpu:8GB", ""):
        with pytest.raises(PlanError, match="device"):
            parse_device(bad)


def test_a_memory_budget_share_may_be_a_number(tmp_path):
    """training.memory_budget: 0.8 as YAML and --set write it (a float), or quoted; a bare
    number above 1 names the forms it takes."""
    from lorastack.train.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("training: {batch_size: auto, memory_budget: 0.8}\n")
    assert load_config(path).training.memory_budget == "0.8"
    assert load_config(path, ["training.memory_budget='0.5'"]).training.memory_budget == "0.5"
    assert load_config(path, ["training.memory_budget=12GB"]).training.memory_budget == "12GB"
    with pytest.raises(ConfigError, match="such as 12GB"):
        load_config(path, ["training.memory_budget=12"])
    with pytest.raises(ConfigError, match="memory_budget"):
        load_config(path, ["training.memory_budget=true"])


def test_cuda_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        assert parse_device("cuda").total_bytes > 0
    else:
        with pytest.raises(PlanError, match="no CUDA GPU"):
            parse_device("cuda")


def _fit(settings: dict, device: str, world: int = 1, **top):
    from lorastack.train.autobatch import fit_to_memory

    return fit_to_memory(build_config({"data": {"max_length": 256}, "training": settings,
                                       **top}), world, device)


def _need(batch: int, ckpt: bool, quant: str = "none", device=CPU_BIG, **training) -> int:
    cfg = build_config({"data": {"max_length": 256}, "quantization": quant,
                        "training": {"batch_size": 8, **training}})
    return plan_memory(cfg, device, batch_size=batch, checkpointing=ckpt).total


def test_a_batch_over_the_budget_is_split_keeping_the_effective_batch(smol):
    from lorastack.train.autobatch import cpu_margin

    full, one = _need(32, False), _need(1, False)
    for usable in (full + 1, (full + one) // 2, one + 1):
        budget = f"{usable / cpu_margin():.0f}B"
        cfg, why = _fit({"batch_size": 16, "grad_accum": 2, "memory_budget": budget},
                        "cpu:64GB")
        t = cfg.training
        assert t.batch_size * t.grad_accum == 32 and t.gradient_checkpointing is False
        assert _need(t.batch_size, False) <= usable and "effective 32" in why
        bigger = [b for b in range(t.batch_size + 1, 17) if 32 % b == 0]
        assert all(_need(b, False) > usable for b in bigger)  # the largest split that fits
    cfg, _ = _fit({"batch_size": 16, "grad_accum": 2, "memory_budget": "60GB"}, "cpu:64GB")
    assert (cfg.training.batch_size, cfg.training.grad_accum) == (16, 2)  # it fits as given


def test_auto_takes_the_largest_batch_that_fits(smol):
    from lorastack.train.autobatch import AUTO_MAX, cpu_margin

    usable = (_need(12, False) + _need(13, False)) // 2
    cfg, why = _fit({"batch_size": "auto", "grad_accum": 3,
                     "memory_budget": f"{usable / cpu_margin():.0f}B"}, "cpu:64GB")
    assert (cfg.training.batch_size, cfg.training.grad_accum) == (12, 3), why
    assert "largest batch" in why
    # no budget: 90% of the device; a large device gets the cap
    cfg, _ = _fit({"batch_size": "auto"}, "cpu:512GB")
    assert cfg.training.batch_size == AUTO_MAX
    # two processes on one CPU machine share its memory: each plans half the budget
    alone, _ = _fit({"batch_size": "auto", "memory_budget": "6GB"}, "cpu:64GB")
    shared, _ = _fit({"batch_size": "auto", "memory_budget": "6GB"}, "cpu:64GB", world=2)
    assert shared.training.batch_size < 2 * alone.training.batch_size


def test_checkpointing_then_a_lower_precision_only_when_they_must(smol):
    off, on = _need(1, False), _need(1, True)
    assert on < off
    from lorastack.train.autobatch import cpu_margin

    cfg, why = _fit({"batch_size": 8, "memory_budget": f"{(off - 1) / cpu_margin():.0f}B"},
                    "cpu:64GB")
    assert cfg.training.gradient_checkpointing and "checkpointing switched on" in why
    assert cfg.training.batch_size * cfg.training.grad_accum == 8
    assert cfg.quantization == "none"
    # on a GPU a 4-bit base is smaller: when nothing fits in float, the base is quantized
    gpu = Device("cuda", 64 * GiB, "cuda")
    float_on = _need(1, True, device=gpu)
    four = _need(1, True, "4bit", device=gpu)
    assert four < float_on
    cfg, why = _fit({"batch_size": 8, "memory_budget": f"{(four + float_on) // 2}B"},
                    "cuda:64GB")
    assert cfg.quantization in ("8bit", "4bit") and "base quantized" in why
    with pytest.raises(PlanError, match="nothing fits"):
        _fit({"batch_size": 8, "memory_budget": "100MB"}, "cuda:64GB")


def test_nothing_asked_nothing_changed():
    cfg = build_config({"training": {"batch_size": 8}})
    from lorastack.train.autobatch import fit_to_memory

    assert fit_to_memory(cfg) == (cfg, None)


def _plan(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from lorastack.commands import app

    result = CliRunner().invoke(app, ["plan", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


def test_plan_command_exit_codes(base_model):
    code, out, _ = _plan("reviews-classify", "--device", "cpu:64GB")
    assert code == 0 and "fits" in out and "activations" in out and "serve: KV cache" in out
    code, out, _ = _plan("reviews-classify", "--device", "cpu:1GB")
    assert code == 1 and "does not fit" in out
    code, out, _ = _plan("reviews-classify", "--device", "cuda:24GiB", "--set",
                         "training.batch_size=64", "--set", "quantization=none")
    assert code == 0 and "batch 64" in out and "cuda (24.0 GiB given)" in out
    # auto: the batch chosen, and why; two processes plan one's share of the global batch
    code, out, _ = _plan("reviews-classify", "--device", "cpu:16GB", "--set",
                         "training.batch_size=auto", "--nproc", "2")
    assert code == 0 and "memory plan: batch_size" in out and "largest batch" in out
    code, out, _ = _plan("reviews-classify", "--device", "cpu:1GB", "--set",
                         "training.batch_size=auto")
    assert code == 1 and "does not fit: nothing fits" in out


def test_plan_command_bad_input_is_one_line():
    code, out, err = _plan("reviews-classify", "--device", "gpu:8")
    assert code == 2 and out == ""
    assert err.startswith("error: device 'gpu:8'") and err.count("\n") == 1
    code, _, err = _plan("reviews-classify", "--set", "training.batch_size=0")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    code, _, err = _plan("no-such-config")
    assert code == 2 and "no config" in err


def test_the_checkpoint_map_counts_only_for_cpu_loads_that_convert(smol):
    def names(quant, device):
        return [r.name for r in plan_memory(_cfg(quantization=quant), device, shape=smol).rows]

    assert "checkpoint map (CPU load)" in names("4bit", CPU_BIG)
    assert "checkpoint map (CPU load)" not in names("none", CPU_BIG)  # float32 file, mapped
    assert "checkpoint map (CPU load)" not in names("4bit", Device("cuda", GiB, "cuda"))


def test_a_config_without_the_fields_is_a_plan_error():
    from transformers import LlamaConfig

    shape = Shape.from_config(LlamaConfig(hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4))
    assert (shape.kv_heads, shape.head_dim) == (4, 16)
    with pytest.raises(PlanError, match="lacks a field"):
        Shape.from_config(object())


def test_a_run_with_batch_size_auto_trains_with_the_chosen_batch(tiny_config, capsys):
    """End to end on the tiny model: auto resolved before the model loads, said, and recorded
    as run in the manifest; resuming re-derives the same choice (the checkpoint agrees)."""
    import json

    from lorastack.train.run import train

    cfg = {**tiny_config, "training": {**tiny_config["training"], "batch_size": "auto",
                                       "memory_budget": "2GB", "max_steps": 2,
                                       "eval_every": 2, "save_every": 1}}
    result = train(cfg)
    said = capsys.readouterr()
    assert "memory plan: batch_size" in said.out + said.err
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    chosen = manifest["training"]["training"]
    assert isinstance(chosen["batch_size"], int) and 1 <= chosen["batch_size"] <= 32
    assert chosen["gradient_checkpointing"] in (True, False)
    assert train(cfg, resume=True).summary["steps"] == 2  # same choice: resumable


def test_auto_keeps_the_4bit_default_of_checkpointing():
    """A 4-bit run checkpoints by default (train/model.py): auto never switches it off."""
    cfg, why = _fit({"batch_size": "auto"}, "cpu:512GB", quantization="4bit")
    assert cfg.training.gradient_checkpointing is True and "switched on" not in why
    cfg, _ = _fit({"batch_size": "auto", "gradient_checkpointing": False}, "cpu:512GB",
                  quantization="4bit")
    assert cfg.training.gradient_checkpointing is False


def test_under_tcmalloc_the_plan_counts_no_allocator_slack(smol):
    from lorastack.adapters import allocator

    cfg = _cfg(quantization="4bit")
    tc = {r.name: r.bytes for r in plan_memory(cfg, CPU_BIG, shape=smol, malloc="tcmalloc").rows}
    glibc = {r.name: r.bytes for r in plan_memory(cfg, CPU_BIG, shape=smol, malloc="system").rows}
    assert tc["allocator slack"] == 0 < glibc["allocator slack"]
    assert {k: v for k, v in tc.items() if k not in ("allocator slack", "runtime")} == \
        {k: v for k, v in glibc.items() if k not in ("allocator slack", "runtime")}
    # by default the plan is for this process's own allocator (pytest's: glibc's malloc)
    assert allocator.active() == "system"
    assert plan_memory(cfg, CPU_BIG, shape=smol).rows == \
        plan_memory(cfg, CPU_BIG, shape=smol, malloc="system").rows
    # on a GPU the CPU allocator does not count
    gpu = Device("cuda", 80 * GiB, "gpu")
    assert plan_memory(cfg, gpu, shape=smol, malloc="tcmalloc").rows == \
        plan_memory(cfg, gpu, shape=smol, malloc="system").rows


@pytest.mark.parametrize(("choice", "says"), [
    ("tcmalloc", "none: tcmalloc returns what a step frees"),
    ("system", "x the activation stack")])
def test_the_plan_command_plans_for_the_allocator_it_runs_under(base_model, choice, says):
    import os
    import subprocess
    import sys
    from pathlib import Path

    lorastack = Path(sys.executable).with_name("lorastack")
    env = {**os.environ, "LORASTACK_ALLOCATOR": choice, "COLUMNS": "200"}
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([str(lorastack), "plan", "reviews-classify"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    slack = next(line for line in proc.stdout.splitlines() if "allocator slack" in line)
    assert says in slack, proc.stdout
    assert (slack.split("│")[2].strip() == "0") == (choice == "tcmalloc")


def test_kept_frozen_states_are_a_row_where_the_run_keeps_them(smol):
    """training.cache_frozen_layers: one float32 per training token and hidden unit, in RAM
    (train/frozen.py); a step then never runs the frozen layers, so float checkpointing saves
    the adapted layers' inputs only."""
    top = {"lora": {"layers": [26, 27, 28, 29]}}
    cached = {**top, "training": {"batch_size": 8, "grad_accum": 1,
                                  "cache_frozen_layers": True}}

    def rows(parts, device=CPU_BIG, **kw):
        plan = plan_memory(_cfg(quantization="none", **parts), device, shape=smol,
                           checkpointing=True, **kw)
        return {r.name: r.bytes for r in plan.rows}, plan.total

    plain, plain_total = rows(top, kept_tokens=70_620)
    kept, kept_total = rows(cached, kept_tokens=70_620)
    assert "kept frozen-layer output" not in plain
    assert kept["kept frozen-layer output"] == 70_620 * 576 * 4  # 155 MiB: the reviews' figure
    # checkpointing keeps each layer's input: 30 layers' without the states, 4 with them
    per_layer = 8 * 256 * 4 * 576
    assert plain["activations"] - kept["activations"] == 26 * per_layer
    assert kept_total - plain_total == 70_620 * 576 * 4 - 26 * per_layer
    # where the run keeps no states, or the plan cannot count them, there is no row
    for parts, kw in ((cached, {}),  # no token count given
                      ({"training": cached["training"]}, {"kept_tokens": 70_620}),  # all layers
                      ({**cached, "data": {"max_length": 256, "augment": "word_dropout"}},
                       {"kept_tokens": 70_620}),
                      (cached, {"kept_tokens": 70_620, "processes": 2}),
                      (cached, {"kept_tokens": 70_620, "device": parse_device("cuda:24GB")})):
        assert "kept frozen-layer output" not in rows(parts, **kw)[0], (parts, kw)


def test_auto_batch_reserves_the_kept_states(smol):
    """batch_size: auto chooses its batch with the kept states in the plan: a budget that the
    batch of 8 just fits with them gets 8, where without them it would get a larger one."""
    from lorastack.train.autobatch import cpu_margin, fit_to_memory

    tokens = 1_000_000  # 2.1 GiB of kept states
    training = {"batch_size": "auto", "grad_accum": 1, "cache_frozen_layers": True,
                "gradient_checkpointing": False}
    cfg = _cfg(quantization="none", lora={"layers": [26, 27, 28, 29]}, training=training)
    need = plan_memory(cfg, "cpu", shape=smol, batch_size=8, checkpointing=False,
                       kept_tokens=tokens).total
    budget = f"{int(need / cpu_margin()) + 1}B"
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"memory_budget": budget})})
    with_states, said = fit_to_memory(cfg, 1, "cpu", kept_tokens=tokens)
    assert with_states.training.batch_size == 8, said
    without, _ = fit_to_memory(cfg, 1, "cpu")
    assert without.training.batch_size > 8


def test_the_kept_states_are_counted_only_where_a_run_keeps_them_and_fits(smol, monkeypatch):
    """Counting the kept states tokenizes the training split: kept_tokens skips it where the
    settings rule the states out, and fit_to_memory calls a lazy count only when the config
    asks for fitting (batch_size auto or a memory_budget), as `lorastack train` passes it."""
    from lorastack.train import plan
    from lorastack.train.autobatch import fit_to_memory

    counted = []
    monkeypatch.setattr(plan, "training_tokens", lambda cfg: counted.append(cfg.name) or 1000)
    training = {"batch_size": 8, "grad_accum": 1, "cache_frozen_layers": True}
    top = {"layers": [26, 27, 28, 29]}
    cfg = _cfg(quantization="none", lora=top, training=training)
    assert plan.kept_tokens(cfg, shape=smol) == 1000 and len(counted) == 1
    for ruled_out, processes in ((_cfg(lora=top, training=training,
                                       data={"max_length": 256, "augment": "word_dropout"}), 1),
                                 (_cfg(training=training), 1),  # every layer adapted
                                 (cfg, 2),  # several processes
                                 (_cfg(lora=top), 1)):  # the setting is off
        assert plan.kept_tokens(ruled_out, processes, smol) is None, ruled_out
    assert len(counted) == 1
    # a fixed batch without a budget: nothing to fit, nothing counted
    assert fit_to_memory(cfg, 1, "cpu", kept_tokens=lambda: plan.kept_tokens(cfg, shape=smol)) \
        == (cfg, None)
    assert len(counted) == 1
    auto = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"batch_size": "auto"})})
    chosen, said = fit_to_memory(auto, 1, "cpu",
                                 kept_tokens=lambda: plan.kept_tokens(auto, shape=smol))
    assert len(counted) == 2 and isinstance(chosen.training.batch_size, int), said
