"""The training loop: steps, evaluation, early stopping, checkpoints and resume.

Checkpoints hold everything needed to continue bit-for-bit: LoRA weights, optimizer moments,
scheduler position, RNG state and the loop counters. All tensors are safetensors and everything
else JSON: nothing is ever pickled. A checkpoint is written to a temporary directory and renamed
into place, so a crash while saving leaves the previous checkpoint intact.

In a run of several processes (train/distributed.py) every process runs this loop on its
shard of each global batch, the LoRA gradients are summed over the processes before each
optimizer step, and rank 0 alone evaluates and writes; the loop state, weights and optimizer
moments stay the same on every process, so checkpoints do not depend on the process count.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lorastack.adapters.files import move_aside
from lorastack.adapters.fsutil import atomic_write_json, staging_dir
from lorastack.train import distributed
from lorastack.train.batching import class_weights, collate, epoch_batches
from lorastack.train.config import LOWER_IS_BETTER, TrainConfig
from lorastack.train.distributed import SINGLE, Dist
from lorastack.train.examples import IGNORE, Example
from lorastack.train.model import answer_loss

if TYPE_CHECKING:
    from lorastack.train.frozen import FrozenPrefix


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # forward passes done in the current epoch
    best_metric: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped_early: bool = False
    tokens: int = 0  # real (non-padding) tokens processed
    answer_tokens: int = 0  # tokens that carried loss
    train_seconds: float = 0.0  # across resumes
    history: list[dict] = field(default_factory=list)  # eval results by step
    overfitting_warned: int = 0  # the step the overfitting watch first warned at (0: never)


class Trainer:
    """Runs `cfg.training` over `examples`; `evaluate()` -> metrics dict on validation."""

    def __init__(self, cfg: TrainConfig, model, examples: list[Example], n_labels: int,
                 pad_id: int, evaluate: Callable[[], dict], run_dir: Path, logger,
                 on_step: Callable[[LoopState], None] | None = None, dist: Dist = SINGLE,
                 evaluate_train: Callable[[], dict] | None = None,
                 reaugment: Callable[[int], list[Example]] | None = None,
                 lockstep: bool = False, prefix: FrozenPrefix | None = None):
        self.cfg, self.t, self.dist = cfg, cfg.training, dist
        # the frozen layers' kept output per training example (train/frozen.py), or None
        self.prefix = prefix
        # a sharded base (training.fsdp): every process runs every forward pass, evaluation too
        self.lockstep = lockstep and dist.active
        self.evaluate_train = evaluate_train  # the overfitting watch's fixed train sample
        # augmentation drawn afresh every epoch: epoch -> that epoch's copy of the examples
        # (epoch 0's is `examples`; the same seed gives the same copy on resume)
        self.reaugment, self._examples_epoch = reaugment, 0
        self.model, self.examples, self.pad_id = model, examples, pad_id
        self.evaluate, self.run_dir, self.log, self.on_step = evaluate, run_dir, logger, on_step
        self.metric = cfg.selection_metric
        balance = cfg.task.balance if cfg.task.type == "classification" else "none"
        self.balanced = balance == "sampling"
        self.weights = (class_weights(examples, n_labels, cfg.task.class_weight_power)
                        if balance == "weights" else None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._set_examples(examples)
        if self.t.loraplus_lr_ratio is not None:  # LoRA+: B at lr x ratio, as peft groups it
            from peft.optimizers import create_loraplus_optimizer

            self.optimizer = create_loraplus_optimizer(
                model, torch.optim.AdamW, lr=self.t.lr, loraplus_lr_ratio=self.t.loraplus_lr_ratio,
                loraplus_weight_decay=self.t.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=self.t.lr,
                                               weight_decay=self.t.weight_decay)
        self.batches_per_epoch = math.ceil(len(examples) / self.t.batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.t.grad_accum)
        self.total_steps = self.t.max_steps or max(1, math.ceil(self.t.epochs * steps_per_epoch))
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            "constant_with_warmup" if self.t.scheduler == "constant" else self.t.scheduler,
            self.optimizer, num_warmup_steps=round(self.t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps)
        self.state = LoopState()
        self.best_metrics: dict | None = None  # this process's evaluation of the best weights
        self.ckpt_dir = run_dir / "checkpoints"
        self.best_dir = run_dir / "best"

    def _set_examples(self, examples: list[Example]) -> None:
        self.examples = examples
        # each example's share of a batch's loss normaliser (answer tokens x class weight):
        # how a process scales its shard's loss so that the summed gradients are one batch's
        self.loss_weight = [sum(1 for t in ex.labels[1:] if t != IGNORE)
                            * (self.weights[ex.label] if self.weights is not None
                               and ex.label >= 0 else 1.0) for ex in examples]

    # -- the loop ---------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> LoopState:
        rank_rng = self._resume() if resume else None
        st, device, dist = self.state, next(self.model.parameters()).device, self.dist
        if dist.active:
            distributed.broadcast_parameters(dist, self.params)  # one start on every process
            if dist.rank > 0:  # its own dropout stream (rank 0 keeps the 1-process one)
                if rank_rng is not None:
                    torch.set_rng_state(rank_rng)
                else:
                    torch.manual_seed(hash((self.t.seed, dist.rank, st.step)) % 2**63)
        bar = tqdm(total=self.total_steps, initial=st.step, desc="training", unit="step",
                   dynamic_ncols=True, disable=not dist.is_main)
        try:  # a pruned trial or a crash closes the bar too
            started = time.monotonic() - st.train_seconds
            window_tokens, window_t0 = 0, time.monotonic()
            while st.step < self.total_steps and not st.stopped_early:
                if self.reaugment is not None and st.epoch != self._examples_epoch:
                    fresh = self.reaugment(st.epoch)
                    if len(fresh) != len(self.examples):
                        raise RuntimeError(f"epoch {st.epoch}'s augmented copy has {len(fresh)} "
                                           f"examples, epoch 0's had {len(self.examples)}")
                    self._set_examples(fresh)
                    self._examples_epoch = st.epoch
                batches = epoch_batches(self.examples, self.t.batch_size, seed=self.t.seed,
                                        epoch=st.epoch, group_by_length=self.t.group_by_length,
                                        balanced=self.balanced)
                while st.batch_in_epoch < len(batches) and st.step < self.total_steps:
                    self.model.train()
                    group = batches[st.batch_in_epoch:st.batch_in_epoch + self.t.grad_accum]
                    loss_sum, step_tokens, step_answer = 0.0, 0, 0
                    for idx in group:
                        mine, idle = dist.shard(idx), False
                        if not mine:  # a short last batch: nothing for this process
                            if not self.lockstep:
                                continue
                            mine, idle = idx[:1], True  # run along (sharded layers), weight 0
                        batch = collate([self.examples[i] for i in mine], self.pad_id, self.weights)
                        batch = {k: v.to(device) for k, v in batch.items()}
                        with (self.prefix.replaying(mine, batch["input_ids"].shape[1])
                              if self.prefix is not None else contextlib.nullcontext()):
                            loss, n_answer = answer_loss(self.model, batch)
                        if dist.active:  # this shard's share of the global batch's mean loss
                            loss = loss * (0.0 if idle else sum(self.loss_weight[i] for i in mine)
                                           / max(sum(self.loss_weight[i] for i in idx), 1e-12))
                        (loss / len(group)).backward()
                        if idle:
                            continue
                        loss_sum += loss.item() / len(group)
                        step_tokens += int(batch["attention_mask"].sum())
                        step_answer += n_answer
                    if dist.active:
                        loss_sum, step_tokens, step_answer = distributed.all_reduce_gradients(
                            dist, self.params, [loss_sum, step_tokens, step_answer])
                        step_tokens, step_answer = round(step_tokens), round(step_answer)
                    if not math.isfinite(loss_sum):  # nothing to learn from past this point
                        from lorastack.train.config import ConfigError

                        raise ConfigError(
                            f"the training loss became {loss_sum} at step {st.step + 1}: "
                            f"train again with a lower training.lr (now {self.t.lr:g}) and "
                            f"training.max_grad_norm set (now {self.t.max_grad_norm})")
                    st.tokens += step_tokens
                    st.answer_tokens += step_answer
                    window_tokens += step_tokens
                    if self.t.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(self.params, self.t.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    st.batch_in_epoch += len(group)
                    st.step += 1
                    st.train_seconds = time.monotonic() - started
                    rate = window_tokens / max(time.monotonic() - window_t0, 1e-9)
                    lr = self.scheduler.get_last_lr()[0]
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                    self.log.scalars(st.step, {"train/loss": loss_sum, "train/lr": lr,
                                               "train/tokens_per_s": rate,
                                               "train/epoch": st.epoch + st.batch_in_epoch
                                               / len(batches)})
                    if st.step % self.t.eval_every == 0 or st.step == self.total_steps:
                        self._evaluate_and_select()
                    if st.step % self.t.save_every == 0 or st.step == self.total_steps:
                        self._save_checkpoint()
                    if self.on_step is not None:
                        self.on_step(st)
                    if st.stopped_early:
                        break
                    window_tokens, window_t0 = 0, time.monotonic()
                if st.batch_in_epoch >= len(batches):
                    st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        finally:
            bar.close()
        if st.best_metric is None:  # no evaluation happened (cannot, but stay safe)
            self._evaluate_and_select()
        return st

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def _evaluate_and_select(self) -> None:
        """Rank 0 evaluates, selects and early-stops; the others receive its decisions (and
        with a sharded base run the same evaluation beside it, whose results rank 0 keeps)."""
        st = self.state
        if self.dist.is_main:
            self._evaluate_on_main()
        elif self.lockstep and not (st.history and st.history[-1]["step"] == st.step):
            self.evaluate()
            if self.evaluate_train is not None:
                self.evaluate_train()
        if self.dist.active:
            self._share_decisions()

    def _share_decisions(self) -> None:
        st, dist = self.state, self.dist
        device = next(self.model.parameters()).device
        evaluated = bool(st.history) and st.history[-1]["step"] == st.step
        best = float("nan") if st.best_metric is None else st.best_metric
        sent = dist.broadcast(torch.tensor(
            [float(evaluated), best, st.best_step, st.evals_without_improvement,
             float(st.stopped_early)], dtype=torch.float64, device=device)).tolist()
        if dist.is_main:
            return
        if sent[0] and not (st.history and st.history[-1]["step"] == st.step):
            st.history.append({"step": st.step})  # the metrics themselves live on rank 0
        st.best_metric = None if math.isnan(sent[1]) else sent[1]
        st.best_step, st.evals_without_improvement = int(sent[2]), int(sent[3])
        st.stopped_early = bool(sent[4])

    def _evaluate_on_main(self) -> None:
        st = self.state
        if st.history and st.history[-1]["step"] == st.step:
            return
        metrics = self.evaluate()
        value = float(metrics[self.metric])
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        logged = {f"validation/{k}": v for k, v in numbers.items()}
        entry = {"step": st.step, **numbers}
        if self.evaluate_train is not None:
            sample = {k: v for k, v in self.evaluate_train().items()
                      if isinstance(v, (int, float))}
            logged.update({f"train_sample/{k}": v for k, v in sample.items()})
            entry["train_sample"] = sample
        st.history.append(entry)
        self.log.scalars(st.step, logged)
        better = (st.best_metric is None or
                  (value < st.best_metric if self.metric in LOWER_IS_BETTER
                   else value > st.best_metric))
        if better:
            st.best_metric, st.best_step, st.evals_without_improvement = value, st.step, 0
            self.best_metrics = metrics
            self._save_best()
        else:
            st.evals_without_improvement += 1
            patience = self.t.early_stopping_patience
            if patience is not None and st.evals_without_improvement >= patience:
                st.stopped_early = True
                self._say(f"early stop at step {st.step}: validation {self.metric} has not "
                          f"improved for {patience} evaluation(s) (best {st.best_metric:.4f} "
                          f"at step {st.best_step})")
        sample = st.history[-1].get("train_sample", {})
        self._say(f"step {st.step}: validation {self.metric}={value:.4f}"
                  f" (best {st.best_metric:.4f} @ {st.best_step})"
                  + (f"; train sample {sample[self.metric]:.4f}" if self.metric in sample
                     else ""))
        note = overfitting_note(st.history, self.metric, st.evals_without_improvement)
        if note and not st.overfitting_warned:
            st.overfitting_warned = st.step
            self._say(note)

    # -- checkpoints ------------------------------------------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # from the trainable parameters alone: the model's state_dict() would also reshard a
        # sharded base on this process only, and the processes' next gathers would not match
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(self.model, trainable).items()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint does not match this model: {unexpected[:3]}")

    def _save_best(self) -> None:
        # as the store replaces an adapter (adapters/files.py write_adapter): the new copy is
        # whole before the old one moves aside, so best/ is one of the two or, for a rename's
        # length, absent with the old one beside it
        old = None
        try:
            with staging_dir(self.best_dir) as tmp:
                save_file(self.adapter_state(), tmp / "adapter.safetensors")
                atomic_write_json(tmp / "best.json", {"step": self.state.step,
                                                      "metric": self.metric,
                                                      "value": self.state.best_metric})
                if self.best_dir.exists():
                    old = move_aside(self.best_dir, "replaced")
        except BaseException:
            if old is not None and not self.best_dir.exists():
                os.rename(old, self.best_dir)  # the new copy did not land: the old one stays
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def best_state(self) -> dict[str, torch.Tensor]:
        """The best evaluated adapter weights (the current ones when none was saved)."""
        saved = self.best_dir / "adapter.safetensors"
        return load_file(saved) if saved.is_file() else self.adapter_state()

    def restore_best(self) -> int:
        """Load the best evaluated weights back into the model; return their step."""
        self.load_adapter_state(self.best_state())
        return self.state.best_step

    def _save_checkpoint(self) -> None:
        st, dist = self.state, self.dist
        device = next(self.model.parameters()).device
        rng_states = [torch.get_rng_state()]
        # on a GPU, dropout draws from the device's generator: kept too
        cuda_states = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if dist.active:  # every process's dropout stream, so that N processes resume exactly
            rng_states = [r.cpu() for r in dist.all_gather(rng_states[0].to(device))]
            if cuda_states:
                cuda_states = [r.cpu() for r in dist.all_gather(cuda_states[0].to(device))]
        target = self.ckpt_dir / f"step-{st.step:07d}"
        if not dist.is_main or target.exists():
            return
        tensors, groups = _flatten_optimizer(self.optimizer.state_dict())
        for kind, states in (("torch", rng_states), ("cuda", cuda_states)):
            for rank, state in enumerate(states):
                tensors[f"rng.{kind}" + (f".rank{rank}" if rank else "")] = state
        with staging_dir(target) as tmp:
            save_file(self.adapter_state(), tmp / "adapter.safetensors")
            save_file(tensors, tmp / "optimizer.safetensors")
            if (self.best_dir / "adapter.safetensors").is_file():  # the best so far, as of now
                shutil.copy2(self.best_dir / "adapter.safetensors", tmp / "best.safetensors")
            sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            atomic_write_json(tmp / "state.json", {
                "loop": asdict(st), "param_groups": groups, "scheduler": sched,
                "python_rng": _jsonable_rng(random.getstate()),
                "config": self.cfg.model_dump(mode="json"),
            })
        for old in sorted(self.ckpt_dir.glob("step-*"))[:-self.t.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> torch.Tensor | None:
        """Load the last checkpoint (every process reads it); return this process's own random
        state when the checkpoint has one for its rank (rank > 0 of a multi-process run)."""
        ckpts = sorted(self.ckpt_dir.glob("step-*"))
        if not ckpts:
            self._say(f"--resume: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return None
        last = ckpts[-1]
        meta = json.loads((last / "state.json").read_text())
        changed = _differences(_essential(meta["config"]),
                               _essential(self.cfg.model_dump(mode="json")))
        if changed:
            from lorastack.train.config import ConfigError

            raise ConfigError(
                f"cannot resume from {last}: the config changed in a way that alters training "
                f"({'; '.join(changed[:4])}). Resume with the same config, or start fresh "
                f"without --resume (delete {self.run_dir} to clean up).")
        self.load_adapter_state(load_file(last / "adapter.safetensors"))
        tensors = load_file(last / "optimizer.safetensors")
        torch.set_rng_state(tensors.pop("rng.torch"))
        rank_rng = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("rng.")]}
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["param_groups"]))
        sched = self.scheduler.state_dict()
        sched.update(meta["scheduler"])
        self.scheduler.load_state_dict(sched)
        random.setstate(_tuple_rng(meta["python_rng"]))
        self.state = LoopState(**meta["loop"])
        own_rng = rank_rng.get(f"rng.torch.rank{self.dist.rank}")
        device = next(self.model.parameters()).device
        own_cuda = rank_rng.get("rng.cuda" + (f".rank{self.dist.rank}" if self.dist.rank else ""))
        if device.type == "cuda" and own_cuda is not None:
            torch.cuda.set_rng_state(own_cuda, device)
        if not self.dist.is_main:  # rank 0 alone keeps the run directory
            return own_rng
        if (last / "best.safetensors").is_file():  # a later best (after this checkpoint) is void
            if self.best_dir.exists():
                shutil.rmtree(self.best_dir)
            with staging_dir(self.best_dir) as tmp:
                shutil.copy2(last / "best.safetensors", tmp / "adapter.safetensors")
                atomic_write_json(tmp / "best.json", {"step": self.state.best_step,
                                                      "metric": self.metric,
                                                      "value": self.state.best_metric})
        self.log.truncate_after(self.state.step)
        tqdm.write(f"resumed from {last.name}: step {self.state.step}/{self.total_steps}, "
                   f"epoch {self.state.epoch}"
                   + (f", in {self.dist.world} processes" if self.dist.active else ""))
        return own_rng


def overfitting_note(history: list[dict], metric: str, evals_without_improvement: int,
                     window: int = 3) -> str | None:
    """A warning when, over the last `window` evaluations, the gap between the train sample's
    and validation's `metric` grew each time while validation stopped improving (at least two
    evaluations without a new best); None otherwise."""
    rows = [r for r in history if metric in r and metric in r.get("train_sample", {})]
    if len(rows) < window or evals_without_improvement < 2:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    gaps = [sign * (r["train_sample"][metric] - r[metric]) for r in rows[-window:]]
    if not all(b > a for a, b in itertools.pairwise(gaps)) or gaps[-1] <= 0:
        return None
    return (f"overfitting watch: the train sample's {metric} leads validation by "
            f"{gaps[0]:.3f} -> {gaps[-1]:.3f} over the last {window} evaluations while "
            f"validation has not improved for {evals_without_improvement}: the best weights "
            f"are kept; consider fewer epochs, a lower lr, more lora.dropout or "
            f"early_stopping_patience")


def checkpointed_config(run_dir: Path) -> dict | None:
    """The config (as saved, batch_size resolved) of the run's last checkpoint, if any."""
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return json.loads((ckpts[-1] / "state.json").read_text())["config"] if ckpts else None


def _differences(saved: dict, now: dict, where: str = "") -> list[str]:
    """The dotted settings whose values differ, as 'path: saved -> now'."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{where}{key}.")
        elif a != b:
            out.append(f"{where}{key}: {a!r} -> {b!r}")
    return out


def _essential(config: dict) -> dict:
    """The parts of a config that change what training computes (not eval cadence etc.).
    Gradient checkpointing recomputes the same activations (with the same dropout masks: torch
    replays the RNG), the kept frozen-layer states are what those layers compute, and the
    memory budget only picks a batch size, which is compared itself (auto is resolved before
    the checkpoint is written), so a resume may change any of them."""
    training = {k: v for k, v in config["training"].items()
                if k not in ("eval_every", "save_every", "keep_checkpoints", "threads",
                             "early_stopping_patience", "watch_train_sample", "fsdp",
                             "gradient_checkpointing", "memory_budget",
                             "cache_frozen_layers")}
    return {"base": config["base"], "quantization": config["quantization"],
            "task": config["task"], "data": config["data"], "lora": config["lora"],
            "training": training}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


def _jsonable_rng(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _tuple_rng(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])
