"""mykd: similarity-preserving KD (Tung & Mori, ICCV 2019) as a kdbench plugin.

The student matches the teacher's batch similarity matrix at the last stage: for features f
(B, C, H, W), G = row-normalised (f f^T) over the flattened features, L = ‖G_s − G_t‖²_F / B².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import FIDELITY_PAPER, STAGES, Batch, Features, Method, MethodConfig, Progress


def similarity_loss(s: Tensor, t: Tensor) -> Tensor:
    """‖G_s − G_t‖²_F / B² in fp32; the widths of s and t may differ (G is B × B)."""
    s, t = s.float().flatten(1), t.float().flatten(1)
    g_s, g_t = F.normalize(s @ s.t(), dim=1), F.normalize(t @ t.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / len(s) ** 2


@dataclass(frozen=True)
class MyKDConfig(MethodConfig):
    beta: float = 3000.0  # RepDistiller's SP command for CIFAR-100 (`--distill similarity -b 3000`)


class MyKD(Method):
    name = "mykd"  # = the entry-point name in pyproject.toml
    paper = "Tung & Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019"
    display_name = "SP"  # the row title in tables
    fidelity = FIDELITY_PAPER  # or FIDELITY_AUTHORS_CODE, FIDELITY_READING
    fidelity_note = "the paper's batch-similarity loss; β from RepDistiller's CIFAR-100 command"
    Config = MyKDConfig
    student_taps = frozenset({STAGES})  # what the engine's hooks collect, by role
    teacher_taps = frozenset({STAGES})

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        # Named, weighted terms; the engine adds cross-entropy ("ce", weight self.ce_weight = 1).
        return {"sp": self.config.beta * similarity_loss(s.stages[-1], t.stages[-1])}
