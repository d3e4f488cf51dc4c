"""Load the base model (float, 8-bit or 4-bit NF4) and attach LoRA; the loss on answer tokens.

The loss runs the output head only where an answer token is predicted: for a classification
example that is 2 positions out of ~150, so the 49k-wide vocabulary projection, the largest
single matmul of a small model, nearly disappears from training (see bench/ for the effect).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorastack.train.base_check import block_suffixes
from lorastack.train.config import ConfigError, TrainConfig


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, float32 on CPU (bf16 is ~30x slower)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: Any):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _model_error(path, "tokenizer", exc) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: TrainConfig, path: Any, device: torch.device, *, stay_on_cpu: bool = False):
    """The frozen base model, quantized as configured, ready for LoRA; in `device`'s precision,
    and on it unless `stay_on_cpu` (a float base that FSDP then moves there in shards)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,  # FSDP shards the packed weights as dtype elements
            **({"bnb_4bit_quant_storage": dtype} if cfg.training.fsdp else {}))
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    elif cfg.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _model_error(path, "model", exc) from None
    if cfg.quantization == "4bit" and device.type == "cpu":
        keep_4bit_trainable(model)
        from lorastack.train.quiet import cpu_4bit_note

        if note := cpu_4bit_note():
            from tqdm.auto import tqdm

            tqdm.write(note)
    if cfg.quantization == "none" and not stay_on_cpu:
        model.to(device)
    model.config.use_cache = False
    return model


def keep_4bit_trainable(model) -> int:
    """Switch off bitsandbytes' CPU inference repacking of 4-bit weights; returns how many
    layers. On a CPU with AVX512-BF16, a Linear4bit's first forward in eval mode without grad
    (a validation pass) repacks its weight for a gemv kernel and keeps it so: every later
    training step then runs that kernel, which is not differentiable with respect to its input,
    so the gradients below each layer lose the base weights' path (measured: layer-0 LoRA
    gradients off by about their own size after one validation pass). Training must never
    take that path; tests/train/test_trainer.py checks the gradients before and after."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def _model_error(path: Any, what: str, exc: Exception):
    """transformers' load failure as a one-line ModelError naming the directory and the fix."""
    from lorastack.adapters.models import ModelError

    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    fix = ("copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) of the model "
           "it came from into the directory" if what == "tokenizer" else
           "check the directory's config.json and weights, or upgrade transformers if the "
           "architecture is newer than it")
    return ModelError(f"transformers cannot load the {what} in {path} ({type(exc).__name__}: "
                      f"{first[:300]}); {fix}")


def attach_lora(cfg: TrainConfig, model):
    """Wrap `model` with a fresh LoRA adapter; only the LoRA weights train."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = cfg.training.gradient_checkpointing
    if checkpointing is None:
        checkpointing = cfg.quantization == "4bit"
    if cfg.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg, model))


def lora_config(cfg: TrainConfig, model):
    """The peft LoraConfig that `cfg.lora` describes for `model` (also used by bench/, so
    that other trainers get exactly the same adapter)."""
    from peft import LoraConfig

    lora = cfg.lora
    targets = lora.target_modules
    if targets == "all-linear" and lora.layers is not None:  # peft wants names with layers
        targets = linear_module_names(model)
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, layers_to_transform=lora.layers,
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
        init_lora_weights="pissa" if lora.init == "pissa" else True)


def linear_module_names(model) -> list[str]:
    """Suffixes of the linear layers (and GPT-2's Conv1D) inside the numbered transformer
    blocks (base_check.block_suffixes)."""
    from transformers.pytorch_utils import Conv1D

    return block_suffixes(name for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear | Conv1D))


def causal_lm(model):
    """The transformers *ForCausalLM inside a PeftModel (LoRA layers injected), or itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# The name under which a sharded causal LM carries lm_answer_logits as a method that FSDP
# gathers its own weights (embeddings, norm, head) around (train/distributed.shard_base).
SHARDED_ANSWER_LOGITS = "lorastack_answer_logits"


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor, **body_kwargs: Any) -> torch.Tensor:
    """Logits (float32) at the boolean `positions` [B, T] only: the head skips the rest.
    `body_kwargs` (a KV cache, position ids) go to the transformer body (label scoring).
    The model's own output processing (final_logits) follows the head, so that these are the
    logits `model(...).logits` has at those positions (check_answer_logits proves it)."""
    lm = causal_lm(model)
    sharded = getattr(lm, SHARDED_ANSWER_LOGITS, None)
    if sharded is not None:
        return sharded(input_ids, attention_mask, positions, **body_kwargs)
    return lm_answer_logits(lm, input_ids, attention_mask, positions, **body_kwargs)


def lm_answer_logits(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positions: torch.Tensor, **body_kwargs: Any) -> torch.Tensor:
    """answer_logits of the causal LM `lm` itself."""
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           **body_kwargs).last_hidden_state
    return final_logits(lm.config, lm.get_output_embeddings()(hidden[positions]).float())


# What transformers' *ForCausalLM.forward does to the head's output, per config attribute:
# Gemma 2/3 soft-cap, Cohere multiplies by logit_scale, Granite divides by logits_scaling.
def final_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, int | float) and scale != 1:
        logits = logits * scale
    divisor = getattr(cfg, "logits_scaling", None)
    if isinstance(divisor, int | float) and divisor != 1:
        logits = logits / divisor
    return logits


class UnknownLogitsError(ConfigError):
    """The base model's forward does more to its logits than lorastack knows how to repeat."""


def check_answer_logits(model, tokenizer: Any, tolerance: float = 1e-3) -> float:
    """Compare answer_logits with the model's own forward on a short text; raise
    UnknownLogitsError when they differ (an architecture whose output processing
    final_logits does not know), before any training rests on them. Returns the gap."""
    ids = torch.tensor([tokenizer("lorastack checks its logits here",
                                  add_special_tokens=False)["input_ids"][:8]])
    device = next(causal_lm(model).parameters()).device
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    positions = torch.ones_like(ids, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = answer_logits(model, ids, mask, positions)
            theirs = model(input_ids=ids, attention_mask=mask).logits[positions].float()
    finally:
        model.train(was_training)
    gap = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max()) or 1.0
    if gap > tolerance * max(1.0, scale):
        arch = ",".join(getattr(causal_lm(model).config, "architectures", None) or ["?"])
        raise UnknownLogitsError(
            f"{arch}: lorastack's answer-position logits differ from the model's own forward "
            f"by {gap:.3g} (the model post-processes its logits in a way lorastack does not "
            f"repeat), so training and evaluation would be silently wrong. This architecture "
            f"is not supported yet; please report it")
    return gap


def answer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Weighted mean cross-entropy over answer tokens, and how many there were.

    `batch["weights"]` [B] weighs each example (class balancing); tokens of one example share
    its weight, and the mean is over the weights so that the scale does not drift.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != -100
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = mask
    logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], positions)
    per_token = F.cross_entropy(logits, targets[mask], reduction="none")
    weights = batch["weights"][:, None].expand_as(targets)[mask].to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum(), int(mask.sum())


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
