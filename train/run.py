"""train(cfg): base model -> data -> LoRA -> training loop -> evaluation -> adapter in the store.

Read top to bottom: this is the whole run. Under torchrun (`lorastack train --nproc N`, see
train/distributed.py) every process runs it: all of them train, rank 0 alone evaluates and
writes the run directory and the store. The pieces live beside it (config, data, examples,
model, loop, evaluate, report); the adapter is written through lorastack.adapters, the contract
the server reads.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorastack.adapters.models import resolve_base
from lorastack.adapters.provenance import describe_machine, library_versions
from lorastack.train.base_check import check_against_base
from lorastack.train.config import (
    ConfigError,
    TrainConfig,
    build_config,
    load_config,
    served_rank,
)
from lorastack.train.data import fingerprint_records, load_splits


@dataclass
class TrainResult:
    name: str
    adapter_dir: Path
    run_dir: Path
    metrics: dict[str, dict]  # {"validation": {...}, "test": {...}}
    summary: dict[str, Any]


def train(cfg: TrainConfig | str | Path | dict, *, resume: bool = False,
          on_step: Callable | None = None) -> TrainResult:
    """Train one adapter as `cfg` says; return where it went and its metrics.

    `cfg` is a TrainConfig, a dict of settings, a YAML path or a shipped config name.
    `resume` continues from the run directory's last checkpoint. `on_step(state)` is called
    after every optimizer step (progress hooks, tests).

    Launched by torchrun (RANK, WORLD_SIZE in the environment), this process trains its shard of
    every global batch; on ranks other than 0 the result has no metrics and nothing is written.
    """
    from lorastack.train import distributed

    cfg = _as_config(cfg)
    t_start = time.monotonic()
    # The base model's identity; the settings that depend on it are checked against its config
    # (seconds), before the run directory is touched or anything else loads.
    base = resolve_base(cfg.base)
    notes = check_against_base(cfg, base.path)
    check_store_name(cfg)
    dist = distributed.from_env()
    for note in notes if dist.is_main else []:
        _say(note)
    if dist.active and isinstance(cfg.training.batch_size, int) \
            and cfg.training.batch_size < dist.world:
        raise ConfigError(f"training.batch_size={cfg.training.batch_size} is the global batch, "
                         f"split over the {dist.world} processes: it must be at least the "
                         f"number of processes")
    # batch_size: auto / memory_budget: batch, checkpointing, precision from the memory plan
    # (reserving training.cache_frozen_layers' kept states: the data are then tokenized once
    # more to count them)
    from lorastack.train.autobatch import fit_to_memory
    from lorastack.train.loop import checkpointed_config
    from lorastack.train.plan import kept_tokens

    t = cfg.training
    saved = checkpointed_config(Path(cfg.runs_dir) / cfg.name) if resume else None
    if saved is not None and (t.batch_size == "auto" or t.memory_budget is not None):
        # the choice the run made, not one made again (another machine, allocator or number
        # of processes would choose otherwise, and the resume would be refused)
        cfg = _as_chosen(cfg, saved)
        chosen = (f"resuming with the batch the run chose: batch_size "
                  f"{cfg.training.batch_size} x grad_accum {cfg.training.grad_accum}, "
                  f"{cfg.quantization} base")
    else:
        cfg, chosen = fit_to_memory(cfg, dist.world,
                                    kept_tokens=lambda: kept_tokens(cfg, dist.world))
    if chosen and dist.is_main:
        _say(chosen)
    device = distributed.init(dist)
    try:
        return _train(cfg, base, dist, device, t_start, resume, on_step)
    finally:
        distributed.close(dist)


def _train(cfg: TrainConfig, base, dist, device, t_start: float, resume: bool,
           on_step: Callable | None) -> TrainResult:
    import torch

    from lorastack.train import evaluate as ev
    from lorastack.train.batching import epoch_batches, padding_fraction
    from lorastack.train.examples import encode_records
    from lorastack.train.loop import Trainer
    from lorastack.train.model import (
        attach_lora,
        check_answer_logits,
        load_base,
        load_tokenizer,
        trainable_parameters,
    )
    from lorastack.train.report import RunLogger, peak_memory_mb, plot_curves, print_summary

    global _quiet
    _quiet = not dist.is_main  # one voice: rank 0's
    if _quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bars of the other processes
    run_dir = Path(cfg.runs_dir) / cfg.name
    if dist.is_main:
        if run_dir.exists() and not resume:
            _clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the others read checkpoints (--resume) only once rank 0 is done clearing
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.training.seed)

    # 1. the base model's tokenizer; the data, as token examples
    tokenizer = load_tokenizer(base.path)
    d = cfg.data
    splits = trained_splits(cfg)
    fmt = prompt_format(cfg, tokenizer, splits.train)
    labels = fmt.labels or None
    train_set = encode_records(fmt, splits.train, "train",
                               augment_seed=cfg.training.seed if d.augment != "none" else None)
    val_set = encode_records(fmt, splits.validation, "validation")
    test_set = encode_records(fmt, splits.test, "test")
    if not train_set.examples or not val_set.examples:
        from lorastack.train.data import DataError

        raise DataError(f"need training and validation examples, got {len(train_set.examples)} "
                        f"and {len(val_set.examples)}: check the data, data.limit_* and "
                        f"data.validation_fraction (or give data.validation)")
    grouped = epoch_batches(train_set.examples, cfg.training.batch_size, seed=0, epoch=0,
                            group_by_length=cfg.training.group_by_length)
    _say(f"data: train {len(train_set.examples)}, validation {len(val_set.examples)}, test "
         f"{len(test_set.examples)} examples; truncated {train_set.truncated + val_set.truncated}"
         f" to max_length={d.max_length}; dropped {train_set.dropped} without an answer; "
         f"padding {padding_fraction(train_set.examples, grouped):.1%} of batch positions")
    if labels:
        _say("labels: " + ", ".join(f"{lb} ({train_set.label_counts[lb]})" for lb in labels))

    # 2. the model: frozen base (quantized as configured) + a fresh LoRA
    sharded = cfg.training.fsdp and dist.active
    if sharded and cfg.quantization != "none" and device.type != "cuda":
        raise ConfigError(f"training.fsdp with quantization={cfg.quantization} needs CUDA: "
                          f"bitsandbytes' {cfg.quantization} weights are not sharded on CPU; "
                          f"use quantization: none, or drop training.fsdp")
    model = attach_lora(cfg, load_base(cfg, base.path, device,
                                       stay_on_cpu=sharded and cfg.quantization == "none"))
    if cfg.lora.init == "pissa" and dist.is_main:
        # PiSSA's starting A, B (the same on resume: the SVD is deterministic), so that the
        # store gets the trained update as a plain LoRA on the untouched base (_export)
        model.save_pretrained(run_dir / PISSA_INIT)
    check_answer_logits(model, tokenizer)  # the loss's logits are the model's own, or refuse
    trainable, total = trainable_parameters(model)
    _say(f"model: {cfg.base} ({cfg.quantization}) on {device}; LoRA r={cfg.lora.r}"
         + (f" (PiSSA init, stored as rank {served_rank(cfg.lora)})"
            if cfg.lora.init == "pissa" else "")
         + (f", LoRA+ B lr x{cfg.training.loraplus_lr_ratio:g}"
            if cfg.training.loraplus_lr_ratio else "")
         + f" trains {trainable:,} of {total:,} parameters ({trainable / total:.2%})")
    if dist.active:
        per = -(-cfg.training.batch_size // dist.world)
        _say(f"data parallel: {dist.world} processes, each up to {per} of every global batch "
             f"of {cfg.training.batch_size} (x grad_accum {cfg.training.grad_accum})")
    if sharded:
        from lorastack.train.distributed import shard_base

        units, held, total = shard_base(model, device)
        _say(f"fsdp: the base's weights sharded over {dist.world} processes in {units} units "
             f"(each decoder layer, then the rest): this process holds {held / 2**20:.1f} of "
             f"{total / 2**20:.1f} MiB; the LoRA weights whole on each")
    elif cfg.training.fsdp:
        _say("training.fsdp: one process, so nothing is sharded (use --nproc N)")

    def evaluate_split(examples, progress=False, with_loss=True) -> dict:
        if cfg.task.type == "classification":
            return ev.evaluate_classification(model, fmt, examples, progress=progress)[0]
        return ev.evaluate_generation(model, fmt, examples, cfg.task.max_new_tokens,
                                      progress=progress, with_loss=with_loss)[0]

    # 3. train, evaluating on validation, keeping the best
    logger = RunLogger(run_dir) if dist.is_main else _NoLog()
    watch = _train_sample(train_set.examples, cfg.training.watch_train_sample, cfg.training.seed)

    def reaugment(epoch: int) -> list:  # every epoch its own draw (epoch 0's is train_set)
        return encode_records(fmt, splits.train, "train",
                              augment_seed=cfg.training.seed + epoch).examples

    prefix = None
    if cfg.training.cache_frozen_layers:
        from lorastack.train import frozen

        reason = frozen.why_not(cfg, model, dist.active)
        if reason is None:
            prefix, said = frozen.build(model, train_set.examples, fmt.pad_id,
                                        base_key=(str(base.path), base.fingerprint,
                                                  cfg.quantization))
            _say(said)
        else:
            _say(f"training.cache_frozen_layers: every step runs every layer: {reason}")
    trainer = Trainer(cfg, model, train_set.examples, len(labels or []), fmt.pad_id,
                      lambda: evaluate_split(val_set.examples), run_dir, logger, on_step, dist,
                      evaluate_train=(lambda: evaluate_split(watch)) if watch else None,
                      reaugment=reaugment if d.augment != "none" else None, lockstep=sharded,
                      prefix=prefix)
    try:
        state = trainer.fit(resume=resume)
    except BaseException:  # a pruned trial, a crash: the event file is flushed and closed
        logger.close()
        raise
    if not dist.is_main:  # done: rank 0 evaluates the best weights and writes the adapter
        return TrainResult(cfg.name, Path(cfg.store or ""), run_dir, {},
                           {"rank": dist.rank, "steps": state.step})
    # sharded: the other processes hold the rest of the base, and they are done
    best_step = state.best_step if sharded else trainer.restore_best()
    trainer_best = trainer.best_metrics  # full validation metrics of the restored weights
    logger.close()
    if cfg.quantization != "none" or sharded:
        # Evaluate as served: vLLM applies the adapter to the float base, not to the 4/8-bit one.
        best = trainer.best_state()
        del trainer
        model = attach_lora(cfg.model_copy(update={"quantization": "none"}),
                            load_base(cfg.model_copy(update={"quantization": "none"}),
                                      base.path, device))
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, best)

    # 4. final metrics of the restored best weights; classification: calibrated on validation
    temperature, bias = 1.0, {}
    if cfg.task.type == "classification":
        from lorastack.train.calibration import calibrated_metrics

        metrics, temperature, bias = calibrated_metrics(
            model, fmt, val_set.examples, test_set.examples if cfg.evaluate_test else [],
            fit=cfg.task.calibrate, fit_bias=cfg.task.label_bias == "macro_f1",
            plot=run_dir / "reliability.png", title=cfg.name)
        if bias:
            from lorastack.adapters.labels import describe_bias

            _say(f"label bias {describe_bias(bias)} fitted on validation: macro-F1 "
                 f"{metrics['validation']['macro_f1_unbiased']:.4f} -> "
                 f"{metrics['validation']['macro_f1']:.4f}")
        if temperature != 1.0:
            _say(f"calibration: temperature {temperature:.3f} fitted on validation; expected "
                 f"calibration error {metrics['validation']['ece_uncalibrated']:.3f} -> "
                 f"{metrics['validation']['ece']:.3f} (reliability.png)")
    elif cfg.quantization == "none" and trainer_best is not None:  # measured on these weights
        metrics = {"validation": trainer_best}
    else:
        metrics = {"validation": evaluate_split(val_set.examples, progress=True)}
    if cfg.task.type != "classification" and cfg.evaluate_test and test_set.examples:
        metrics["test"] = evaluate_split(test_set.examples, progress=True, with_loss=False)

    # 5. the adapter, atomically into the store; the run's record beside it
    adapter = _export(cfg, model, base, fmt, labels, metrics, splits.train, splits.validation,
                      temperature, bias)
    plot_curves(run_dir, cfg.selection_metric, f"{cfg.name}: {cfg.task.type}, "
                f"{cfg.base} ({cfg.quantization}), LoRA r={cfg.lora.r}")
    summary = {
        "name": cfg.name, "task": cfg.task.type, "adapter_dir": str(adapter.path),
        "metrics": metrics, "steps": state.step, "best_step": best_step,
        "stopped_early": state.stopped_early, "overfitting_warned_at": state.overfitting_warned,
        "train_seconds": round(state.train_seconds, 1),
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "tokens": state.tokens, "answer_tokens": state.answer_tokens,
        "tokens_per_second": state.tokens / max(state.train_seconds, 1e-9),
        "peak_memory_mb": round(peak_memory_mb()), "device": str(device),
        "processes": dist.world,
        "machine": describe_machine(),
    }
    from lorastack.adapters.fsutil import atomic_write_json

    atomic_write_json(run_dir / "summary.json", summary)
    print_summary(summary)
    return TrainResult(cfg.name, adapter.path, run_dir, metrics, summary)


def _train_sample(examples: list, n: int, seed: int) -> list:
    """The overfitting watch's fixed sample of training examples (the same at every
    evaluation, and on resume)."""
    import random

    if n <= 0:
        return []
    return random.Random(seed).sample(examples, min(n, len(examples)))


def check_store_name(cfg: TrainConfig) -> None:
    """With replace: false, an adapter of the name already in the store is refused before the
    run, not when its result is written (lorastack train and lorastack tune ask)."""
    from lorastack.adapters.store import AdapterStore

    if cfg.replace:
        return
    store = AdapterStore(cfg.store)
    if store.exists(cfg.name):
        raise ConfigError(f"replace: false, and the store {store.root} already holds an "
                          f"adapter named {cfg.name!r}: give another name, set replace: true, "
                          f"or remove it first (lorastack adapters rm {cfg.name})")


def _as_chosen(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """`cfg` with the batch, checkpointing and base precision of a checkpoint's config."""
    keys = ("batch_size", "grad_accum", "gradient_checkpointing")
    training = cfg.training.model_copy(update={**{k: saved["training"][k] for k in keys},
                                               "memory_budget": None})
    return cfg.model_copy(update={"quantization": saved["quantization"], "training": training})


def prompt_format(cfg: TrainConfig, tokenizer, train_records: list[dict]):
    """The PromptFormat a run encodes with: a classifier's labels from task.labels, else those
    found in the training records."""
    from lorastack.adapters.manifest import ManifestError, check_task
    from lorastack.train.data import DataError
    from lorastack.train.examples import PromptFormat, infer_labels

    labels = None
    task = cfg.task
    if task.type == "classification":
        labels = task.labels or infer_labels(train_records, task.label_field)
        if not task.labels:  # the rules the config's labels were checked against
            try:
                check_task(task.type, task.prompt, labels, task.label_words)
            except ManifestError as exc:
                raise DataError(f"the labels found in the field {task.label_field!r} of the "
                                f"training data: {exc.problem}; clean the data or list "
                                f"task.labels") from None
    return PromptFormat(tokenizer, cfg, labels)


def config_splits(cfg: TrainConfig, columns: dict | None = None):
    """The train/validation/test records a config trains and evaluates on (validation carved
    with data.split_seed, stratified by label for classification)."""
    d = cfg.data
    return load_splits(d.source, validation=d.validation, test=d.test,
                       columns=columns if columns is not None else d.columns,
                       validation_fraction=d.validation_fraction, seed=d.split_seed,
                       stratify=cfg.task.label_field if cfg.task.type == "classification"
                       else None)


def trained_splits(cfg: TrainConfig):
    """config_splits as a run uses them: cut to data.limit_train and data.limit_eval."""
    d = cfg.data
    splits = config_splits(cfg)
    if d.limit_train:
        splits.train = splits.train[:d.limit_train]
    if d.limit_eval:
        splits.validation = splits.validation[:d.limit_eval]
        splits.test = splits.test[:d.limit_eval]
    return splits


def _export(cfg: TrainConfig, model, base, fmt, labels, metrics, train_records,
            validation_records, temperature: float = 1.0, bias: dict | None = None):
    from peft import LoraConfig

    from lorastack.adapters.manifest import AdapterManifest, LoraSettings, Metrics
    from lorastack.adapters.store import AdapterStore

    store = AdapterStore(cfg.store)
    with tempfile.TemporaryDirectory(prefix="lorastack-export-") as tmp:
        # adapter_config.json + adapter_model.safetensors; PiSSA's is converted by peft into a
        # plain LoRA of rank 2r on the untouched base: [A; A0], [B, -B0]
        init = Path(cfg.runs_dir) / cfg.name / PISSA_INIT if cfg.lora.init == "pissa" else None
        with warnings.catch_warnings():  # peft's advice to convert, given while converting
            warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=init and str(init))
        peft_cfg = LoraConfig.from_pretrained(tmp)
        manifest = AdapterManifest(
            name=cfg.name, task=cfg.task.type, base_model=cfg.base,
            base_fingerprint=base.fingerprint,
            lora=LoraSettings(rank=peft_cfg.r, alpha=float(peft_cfg.lora_alpha),
                              target_modules=tuple(sorted({m.rsplit(".", 1)[-1]
                                                          for m in peft_cfg.target_modules})),
                              dropout=float(peft_cfg.lora_dropout),
                              use_dora=bool(peft_cfg.use_dora),
                              use_rslora=bool(peft_cfg.use_rslora)),
            prompt_template=fmt.task.prompt if not fmt.task.messages_field else "{input}",
            chat_format=fmt.chat_format, prompt_format=fmt.prompt_format,
            end_of_turn=fmt.end_of_turn,
            score_end_of_turn=bool(labels) and fmt.score_end,
            labels=tuple(labels or ()), label_words=dict(cfg.task.label_words),
            temperature=temperature, label_bias=dict(bias or {}),
            examples=_examples(validation_records, cfg.data.text_field),
            metrics=Metrics(validation=manifest_numbers(metrics.get("validation", {})),
                            test=manifest_numbers(metrics.get("test", {}))),
            training=cfg.model_dump(mode="json", exclude={"search"}),
            data_fingerprint=fingerprint_records(train_records),
            versions=library_versions())
        return store.write(cfg.name, Path(tmp), manifest, replace=cfg.replace)


PISSA_INIT = "pissa-init"  # in the run directory: PiSSA's initial adapter


def _examples(records: list[dict], field: str, n: int = 6) -> tuple[str, ...]:
    """The first few validation texts, shortened, for the manifest (demos, model cards)."""
    texts = [str(r[field]) for r in records if isinstance(r.get(field), str) and r[field]]
    return tuple(t if len(t) <= 400 else t[:400].rsplit(" ", 1)[0] + " ..." for t in texts[:n])


def manifest_numbers(metrics: dict) -> dict[str, float]:
    """An evaluation's numbers as the manifest keeps them: the scalars, and each label's F1 as
    f1_<label>."""
    out = {k: float(v) for k, v in metrics.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"f1_{label}": float(row["f1"])
                for label, row in (metrics.get("per_class") or {}).items()})
    return out


def _as_config(cfg: TrainConfig | str | Path | dict) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, dict):
        return build_config(cfg)
    return load_config(cfg)


def _clear_run(run_dir: Path) -> None:
    """A fresh (not resumed) run starts with an empty run directory."""
    import shutil

    if any((run_dir / "checkpoints").glob("step-*")):
        _say(f"starting fresh: discarding the checkpoints of the earlier run in {run_dir} "
             f"(train with --resume to continue from them instead)")

    for sub in ("checkpoints", "best", "tensorboard"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    for f in ("metrics.jsonl", "summary.json", "training.png"):
        (run_dir / f).unlink(missing_ok=True)


_quiet = False  # set on ranks other than 0 of a multi-process run


class _NoLog:
    """The run logger of ranks other than 0: they write nothing."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    if not _quiet:
        tqdm.write(message)
