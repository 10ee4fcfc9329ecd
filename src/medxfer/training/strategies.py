"""Fine-tuning strategies: which weights are trained, and at which learning rate.

scratch         random init, everything trained (pretrained weights are never loaded)
full            pretrained encoder loaded, everything trained; the encoder at lr * pretrained_encoder_lr_factor
frozen_encoder  pretrained encoder loaded and frozen (BatchNorm statistics too); decoder + head trained
partial         the first ``frozen_levels`` encoder levels frozen, the rest trained (encoder as in full)
discriminative  everything trained, the encoder at ``lr * encoder_lr_factor``
gradual         the encoder frozen (BatchNorm statistics too) for ``unfreeze_after_steps`` optimizer steps, then
                everything trained at ``lr`` (``unfreeze_if_due``, called by the training task every step)
"""

from __future__ import annotations

import torch

from medxfer.config import TrainConfig
from medxfer.models.weights import freeze_encoder

STRATEGIES = ("scratch", "full", "frozen_encoder", "partial", "discriminative", "gradual")


def loads_pretrained(strategy: str) -> bool:
    return strategy != "scratch"


def encoder_lr(train: TrainConfig, pretrained: bool) -> float:
    """The encoder's learning rate: ``lr * encoder_lr_factor`` for "discriminative", ``lr *
    pretrained_encoder_lr_factor`` for "full" / "partial" with a loaded pretrained encoder, else ``lr``."""
    if train.strategy == "discriminative":
        return train.lr * train.encoder_lr_factor
    if pretrained and train.strategy in ("full", "partial"):
        return train.lr * train.pretrained_encoder_lr_factor
    return train.lr


def apply_strategy(model: torch.nn.Module, train: TrainConfig, pretrained: bool = False) -> list[dict]:
    """Freeze what the strategy freezes and return the optimizer's parameter groups (``pretrained``: the
    encoder's weights were loaded, see :func:`encoder_lr`)."""
    if train.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {train.strategy!r}; known: {', '.join(STRATEGIES)}")
    if train.strategy == "gradual":
        # every weight in the optimizer from the start: frozen ones get no gradient, so no update, until
        # unfreeze_if_due thaws them
        freeze_encoder(model, "all")
        return [{"params": list(model.encoder.parameters()), "lr": train.lr, "name": "encoder"},
                {"params": [p for n, p in model.named_parameters() if not n.startswith("encoder.")],
                 "lr": train.lr, "name": "decoder"}]
    if train.strategy == "frozen_encoder":
        freeze_encoder(model, "all")
    elif train.strategy == "partial":
        freeze_encoder(model, train.frozen_levels)
    else:
        freeze_encoder(model, 0)
    encoder_params = {id(p) for p in model.encoder.parameters()}
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_params]
    groups = []
    if encoder:
        groups.append({"params": encoder, "lr": encoder_lr(train, pretrained), "name": "encoder"})
    if rest:
        groups.append({"params": rest, "lr": train.lr, "name": "decoder"})
    return groups


def unfreeze_if_due(model: torch.nn.Module, train: TrainConfig, global_step: int) -> bool:
    """For the "gradual" strategy: unfreeze the whole encoder once ``global_step`` (optimizer steps done)
    reaches ``unfreeze_after_steps`` (also right away when a resumed run is past it). Returns whether it
    unfroze now."""
    if train.strategy != "gradual" or global_step < (train.unfreeze_after_steps or 0):
        return False
    if model.encoder.frozen_levels == 0:
        return False
    freeze_encoder(model, 0)
    model.encoder.train(model.training)
    return True


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over parameter ``groups`` (a group's own ``weight_decay`` wins).

    The fused implementation wherever every parameter is a float tensor on the CPU or a CUDA GPU: one kernel
    for all parameters instead of a dozen elementwise passes each (AdamW on the 22.6 M parameters of unet3d
    at width 32: 953 ms against 2614 ms per step for the default, 1652 ms for foreach, on this 2-core CPU).
    """
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused,
                               nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {name!r} (sgd, adam, adamw)")


def build_optimizer(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    return make_optimizer(train.optimizer, groups, train.lr, train.momentum, train.weight_decay,
                          nesterov=train.nesterov and train.optimizer == "sgd")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """A per-step schedule (Lightning ``interval="step"``), or None."""
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if train.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total_steps // 3), gamma=0.1)
    if train.scheduler == "poly":  # nnU-Net's
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, total_steps), power=0.9)
    return None


def resolve_accelerator(accelerator: str) -> str:
    """The accelerator as given, after checking that a GPU one is present (Lightning's own error is a
    multi-line traceback)."""
    from medxfer.errors import ConfigError

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator: {accelerator!r} asked for, but no CUDA GPU is available "
                          "(use 'auto' or 'cpu')")
    if accelerator == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("train.accelerator: 'mps' asked for, but no Apple GPU is available (use 'auto' or 'cpu')")
    return accelerator


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> mixed precision where a GPU supports it (bf16, else fp16), fp32 on the CPU
    (CPU autocast is slower than fp32 for these convolutions)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def prefers_channels_last(model: torch.nn.Module, spatial_dims: int) -> bool:
    """Whether a 2D ``model`` trains with channels-last (NHWC) weights.

    On a GPU: always (cuDNN's fastest 2D kernels are NHWC). On the CPU: only for models with depthwise
    convolutions (EfficientNet-Lite): in NCHW at one thread PyTorch sends the 1x1 convolutions of their
    depthwise-separable blocks to its im2col path, in NHWC to oneDNN. ``benchmarks/bench_layout.py``
    (``results/layout.json``, batch 4 of 64^2, one thread): efficientnet_lite0_unet 0.77x the NCHW step time;
    the classic U-Nets 0.90-0.93x; the ResNet encoders 1.42-1.44x (their weight gradients are copied between
    layouts), so those stay NCHW."""
    if spatial_dims != 2:
        return False
    if torch.cuda.is_available():
        return True
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())
