"""Optimiser and learning-rate schedule factory: the one-cycle recipe of the original pipeline.

Only library optimisers are used: AdamW from torch.optim by default, or with `use_over9000_optimizer`
the "over9000" combination of Lookahead (pytorch-optimizer) over RAdam (torch.optim). The schedule is
torch's OneCycleLR: warm-up from max_lr / div_factor to `max_lr`, then cosine annealing to
max_lr / (div_factor * final_div_factor), with momentum (beta1) cycled inversely.
"""

from __future__ import annotations

import torch
from torch import nn

from lib.errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay, and biases / normalisation parameters (1-D tensors) without.

    Decaying a norm layer's scale or a bias only pulls it toward zero without regularising anything.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, over9000: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), lookahead_k: int = 5,
                    lookahead_alpha: float = 0.5) -> torch.optim.Optimizer:
    """AdamW (default) or Lookahead(RAdam) with decoupled weight decay over `param_groups(model)`."""
    if not lr > 0:
        raise UserError(f"max_lr={lr}: the learning rate must be positive")
    if weight_decay < 0:
        raise UserError(f"weight_decay={weight_decay}: must be >= 0")
    groups = param_groups(model, weight_decay)
    if not over9000:
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    from pytorch_optimizer import Lookahead

    radam = torch.optim.RAdam(groups, lr=lr, betas=betas, decoupled_weight_decay=True)
    return Lookahead(radam, k=lookahead_k, alpha=lookahead_alpha)


def build_scheduler(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3,
                    div_factor: float = 25.0, final_div_factor: float = 1e4):
    """torch's OneCycleLR over `total_steps` optimiser steps (call `.step()` once per step)."""
    if total_steps < 1:
        raise UserError(f"total training steps = {total_steps}: need at least one step; raise num_epochs or max_steps")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=int(total_steps), pct_start=pct_start,
        div_factor=div_factor, final_div_factor=final_div_factor,
        anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the first parameter group (all groups share the schedule)."""
    return float(optimizer.param_groups[0]["lr"])


def build_one_cycle(net, cfg, lr: float, total_steps: int) -> tuple:
    """(optimizer, scheduler) of the recipe both tasks train with, from the config's optimiser keys."""
    optimizer = build_optimizer(net, lr, float(cfg.weight_decay), over9000=bool(cfg.use_over9000_optimizer))
    scheduler = build_scheduler(optimizer, lr, total_steps, pct_start=float(cfg.pct_start),
                                div_factor=float(cfg.div_factor), final_div_factor=float(cfg.final_div_factor))
    return optimizer, scheduler
