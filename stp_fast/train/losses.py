"""Losses of stimulative training: the full net's cross-entropy and each subnet's KL to a detached
teacher (``ALGORITHMS.md`` 3.1: ``KLDiv(log_softmax(student/T), softmax(teacher/T)) * T^2``, batchmean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm_logits(z: Tensor, amplitude: float = 1.0) -> Tensor:
    """ST++ "KD-": zero mean, unit std per sample, no affine (eps 1e-7 as in the official code)."""
    return F.layer_norm(z, z.shape[-1:], eps=1e-7) * amplitude


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, *, norm: bool = False) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` averaged over the batch.

    ``teacher`` is detached here, so callers cannot accidentally back-propagate into it.  Computed
    in float32 (logits from bf16 autocast are upcast)."""
    s, t = student.float(), teacher.detach().float()
    if norm:
        s, t = layer_norm_logits(s), layer_norm_logits(t)
    log_p = F.log_softmax(s / temperature, dim=-1)
    q = F.softmax(t / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def stp_losses(logits: list[Tensor], targets: Tensor, teachers: list[int], *, temperature: float, kd_weight: float,
               label_smoothing: float = 0.0, norm_kd: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Total loss of one step, the full net's CE, and the per-subnet KD losses (detached, shape [S-1]).

    ``logits[0]`` is the full net; ``logits[i]`` (i >= 1) distils from ``logits[teachers[i - 1]]``
    (0 = the full net; another index = an assistant subnet).  The sum of all terms is back-propagated
    once, which gives the same gradients as ST's per-loss backward passes (one optimizer step)."""
    ce = F.cross_entropy(logits[0].float(), targets, label_smoothing=label_smoothing)
    kds = [kd_loss(z, logits[t], temperature, norm=norm_kd) for z, t in zip(logits[1:], teachers)]
    total = ce + kd_weight * torch.stack(kds).sum() if kds else ce
    kd_values = torch.stack(kds).detach() if kds else logits[0].new_zeros(0, dtype=torch.float32)
    return total, ce.detach(), kd_values
