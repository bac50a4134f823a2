"""Distillation losses shared by the methods (teacher outputs are always detached here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2 (Hinton's scaling), batch mean."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (t * t)


def soft_target_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's softmax (OFA's distillation term)."""
    p_teacher = F.softmax(teacher_logits.detach(), dim=1)
    return -(p_teacher * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """SN-Net/DeiT hard distillation: ½·CE(out, y) + ½·CE(out, argmax teacher)."""
    teacher_labels = teacher_logits.detach().argmax(dim=1)
    return 0.5 * F.cross_entropy(student_logits, labels) + 0.5 * F.cross_entropy(student_logits, teacher_labels)
