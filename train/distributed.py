"""Training on several processes: torchrun launches them, torch.distributed joins them.

`lorastack train CONFIG --nproc N` re-runs the same command under torchrun
(`python -m torch.distributed.run --standalone`: a local rendezvous on a free port) with N
worker processes; `torchrun --nproc-per-node N -m lorastack train CONFIG` does the same by
hand. A worker finds its rank in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)
and joins the process group: gloo on CPU, nccl on CUDA (one GPU per process).

Data parallelism, defined so that N processes compute what one process computes:
- `training.batch_size` is the global batch of one forward pass, summed over the processes.
  Every process builds the same epoch order (a pure function of seed and epoch) and takes its
  shard of every global batch (rank r: positions r, r+N, ...), so the batches, the number of
  steps, the schedule and the checkpoints are those of a 1-process run.
- Each process scales its loss by its share of the global batch's loss weight (answer tokens
  times class weight), and the LoRA gradients are summed over the processes (one all-reduce of
  one flat buffer per optimizer step, after gradient accumulation). The summed gradient is the
  gradient of the global batch's weighted mean loss, exactly as one process computes it, even
  when shards are uneven or a shard is empty (a short last batch).
  This is what DistributedDataParallel does for the LoRA parameters, written out because DDP
  averages (1/N), not weight-normalises, and needs every rank to run a forward pass.
- Every process holds the same LoRA weights and optimizer moments (same start, broadcast from
  rank 0; same summed gradients), so a checkpoint does not depend on the process count: one
  written by 2 processes resumes in 1 and the other way round.
- Rank 0 alone evaluates, writes the run directory (metrics, plots, checkpoints, best) and
  the store; it broadcasts what evaluation decided (best, early stop) to the others.
- A process that fails ends the run: torchrun stops the others and the command exits with the
  failed process's message and status (no hang).

Sharded (`training.fsdp`): the same, except where the frozen base's weights live. torch's FSDP2
(`fully_shard`) splits every decoder layer's weights, and the rest of the base's (embeddings,
final norm, head), over the processes; a layer's are gathered for its forward pass (and again
for backward) and freed after. The LoRA weights are left out of sharding (`ignored_params`), so
the gradient sum, the optimizer, the checkpoints and the store above are unchanged, and a
checkpoint resumes with or without sharding. What it needs: every process runs every forward
pass, so a process with an empty shard runs one example at zero loss weight, and validation
runs on every process in step (rank 0 keeps its results); rank 0 then evaluates and exports the
best weights on a fresh unsharded base, as a quantized run does on the float one.

What differs from 1 process: float sums in another order (each shard's gradient, then the
all-reduce; thread counts; padding to each shard's own length), ~1e-7 relative per step; and
LoRA dropout, whose masks come from each process's own random stream.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lorastack.adapters import allocator

ENV_TIMEOUT = "LORASTACK_DIST_TIMEOUT_S"  # collective timeout (rank 0 evaluates meanwhile)


class LaunchError(ValueError):
    """--nproc cannot run here (count out of range, no torchrun)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; the defaults are a plain 1-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: list[int]) -> list[int]:
        """This process's part of a global batch of example indices."""
        return batch[self.rank::self.world] if self.active else batch

    # -- collectives (no-ops in one process) ------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def all_reduce_sum(self, tensor):
        """Sum `tensor` over the processes, in place; returns it."""
        if self.active:
            import torch.distributed as td

            td.all_reduce(tensor, op=td.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor):
        """Rank 0's `tensor` on every process, in place; returns it."""
        if self.active:
            import torch.distributed as td

            td.broadcast(tensor, src=0)
        return tensor

    def all_gather(self, tensor) -> list:
        """Every process's `tensor` (same shape and dtype on all), by rank."""
        if not self.active:
            return [tensor]
        import torch
        import torch.distributed as td

        out = [torch.empty_like(tensor) for _ in range(self.world)]
        td.all_gather(out, tensor)
        return out


SINGLE = Dist()


def from_env() -> Dist:
    """The Dist torchrun's environment describes (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(rank=int(os.environ["RANK"]), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist):
    """Join the process group (when there are several processes); return this process's
    torch device: cuda:<local rank> with nccl where CUDA is, else cpu with gloo."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", dist.local_rank) if cuda else torch.device("cpu")
    if not dist.active:
        return torch.device("cuda") if cuda else device
    import torch.distributed as td

    if cuda:
        torch.cuda.set_device(device)
    if not td.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "10800")))
        td.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                              **({"device_id": device} if cuda else {}))
    return device


def close(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def available_workers() -> tuple[int, str]:
    """How many processes this machine can run one each: (count, what they are)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count(), "GPUs"
    except ImportError:  # pragma: no cover - torch is a dependency of train
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return cores, "CPU cores"


def check_nproc(nproc: int) -> None:
    """Refuse a process count this machine cannot run, with the reason and the fix."""
    count, what = available_workers()
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: the number of training processes must be at "
                          f"least 1 (this machine has {count} {what})")
    if nproc > count:
        raise LaunchError(f"--nproc {nproc}: this machine has {count} {what}, and each "
                          f"training process needs one of its own; use --nproc {count} or "
                          f"fewer")


def launch_command(nproc: int, target: list[str]) -> list[str]:
    """torchrun on this Python (its arguments; see `torchrun` below): a standalone rendezvous
    on a free port, N workers, no restarts, then `target` (`-m module args` or `script args`)."""
    return [sys.executable, "-m", "lorastack.train.distributed", "--standalone",
            f"--nproc-per-node={nproc}", "--max-restarts=0", *target]


def torchrun(argv: list[str]) -> int:
    """torch.distributed.run (torchrun) with these arguments, reporting a failed worker in one
    line (which process, how it ended) instead of torchrun's traceback; its exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"signal {failure.signal_name()}" if failure.exitcode < 0
               else f"exit status {failure.exitcode}")
        print(f"error: training process {rank} of {args.nproc_per_node} failed ({how}), its "
              f"message is above; the other processes were stopped", file=sys.stderr,
              flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def launch(nproc: int, target: list[str], env: dict[str, str] | None = None) -> int:
    """Run `target` in `nproc` processes under torchrun; return its exit status (0 when every
    process succeeded; otherwise the failed one's, after torchrun stopped the others)."""
    check_nproc(nproc)
    env = allocator.environment(os.environ if env is None else env)  # tcmalloc, as for one
    count, what = available_workers()
    if what == "CPU cores" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, count // nproc))  # cores shared, not oversubscribed
    env.pop("WORLD_SIZE", None)  # a fresh group, even when launched from inside another
    env.setdefault("PYTHONUNBUFFERED", "1")  # the workers' lines as they come
    if shutil.which(sys.executable) is None:  # pragma: no cover - sanity
        raise LaunchError(f"cannot find the Python interpreter {sys.executable}")
    proc = subprocess.Popen(launch_command(nproc, target), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the workers got ^C too: give torchrun time to stop them
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            return proc.wait()


def shard_base(model: Any, device: Any) -> tuple[int, int, int]:
    """Shard `model`'s frozen weights over the process group with FSDP2: each decoder layer (the
    classes transformers names in `_no_split_modules`) one unit, the rest of the model the root
    unit; trainable (LoRA) weights stay whole and unsharded. Returns the number of units, and
    the bytes of frozen weights this process holds and all of them."""
    import types

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from lorastack.train.model import SHARDED_ANSWER_LOGITS, causal_lm, lm_answer_logits

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    trainable = {p for p in model.parameters() if p.requires_grad}
    lm = causal_lm(model)
    blocks = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in blocks]
    if not layers:
        raise LaunchError(f"training.fsdp: {type(lm).__name__} names no decoder-layer class "
                          f"(_no_split_modules) to shard by; train without training.fsdp")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=trainable)
    # the root unit is the causal LM (its embeddings, final norm and head, tied or not); the
    # loop's answer_logits calls its body and head without its forward(), so FSDP is told to
    # gather them around that method too
    setattr(lm, SHARDED_ANSWER_LOGITS, types.MethodType(lm_answer_logits, lm))
    fully_shard(lm, mesh=mesh, ignored_params=trainable)
    register_fsdp_forward_method(lm, SHARDED_ANSWER_LOGITS)
    with torch.no_grad():  # left where they were: on this process's device, like the shards
        for p in trainable:
            p.data = p.data.to(device)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    held = sum(getattr(p, "to_local", lambda p=p: p)().numel() * p.element_size() for p in frozen)
    return len(layers) + 1, held, sum(p.numel() * p.element_size() for p in frozen)


def broadcast_parameters(dist: Dist, params: list[Any]) -> None:
    """Rank 0's values of `params` on every process (one flat broadcast)."""
    if not dist.active or not params:
        return
    import torch

    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    dist.broadcast(flat)
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
            offset += n


def all_reduce_gradients(dist: Dist, params: list[Any], extra: list[float]) -> list[float]:
    """Sum the gradients of `params` over the processes (None counts as zeros) and the numbers
    `extra` with them, in one all-reduce; returns the summed `extra`."""
    import torch

    if not dist.active:
        return extra
    device = params[0].device
    parts = [p.grad.reshape(-1).float() if p.grad is not None
             else torch.zeros(p.numel(), device=device) for p in params]
    parts.append(torch.tensor(extra, dtype=torch.float64).float().to(device))
    flat = dist.all_reduce_sum(torch.cat(parts))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    return flat[offset:].double().tolist()


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
