"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928).

The activation-based attention map of a feature map f (B, C, H, W) is the channel mean of
f^p, flattened and L2-normalised per sample; the student matches the teacher's map at the end
of every stage. L = CE + β · Σ_stages mean((a(f_s) − a(f_t))²).

Stage lists of different lengths (a VGG has 4 stages, WRN/ResNet 3) are paired by relative
depth, see ``pair_stages``; maps of different spatial sizes are compared after average-pooling
the larger feature map to the smaller size (RepDistiller's ``distiller_zoo/AT.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdbench.method import FIDELITY_AUTHORS_CODE, STAGES, Batch, Features, Method, MethodConfig, Progress


def pair_stages(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student stage, teacher stage) pairs: every stage of the shorter list, each matched with
    the stage of the longer list at the nearest relative depth ((i + 1) / n), in order.

    Equal lengths give the identity, as in the authors' code and RepDistiller (which only pair
    networks with equally many stages). For 3 vs 4 stages (WRN/ResNet vs VGG) this pairs 0↔0,
    1↔2, 2↔3: the deepest (last, most semantic) stages are always matched and the longer
    network's extra stage is skipped in the middle — unlike ``zip`` in RepDistiller/mdistiller,
    which pairs the first n and silently drops the longer network's deepest stage."""
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"need at least one stage on each side, got {num_student} and {num_teacher}")
    short, long = sorted((num_student, num_teacher))
    # round((i + 1) * long / short) - 1 is strictly increasing in i because long >= short.
    mapped = [round((i + 1) * long / short) - 1 for i in range(short)]
    if num_student <= num_teacher:
        return list(zip(range(short), mapped))
    return list(zip(mapped, range(short)))


def pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both (B, C, H, W) maps at the smaller of their spatial sizes: the larger is
    adaptive-average-pooled down (RepDistiller's AT, NST, VID, FSP and FT losses), the other is
    returned as it is. Used wherever a method compares maps of two resolutions."""
    height, width = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    if a.shape[2:] != (height, width):
        a = F.adaptive_avg_pool2d(a, (height, width))
    if b.shape[2:] != (height, width):
        b = F.adaptive_avg_pool2d(b, (height, width))
    return a, b


def attention_map(feature: Tensor, p: float) -> Tensor:
    """a(f) = normalize(mean_c f^p) as a (B, H·W) matrix, rows of unit L2 norm.

    The channel *mean* (not the paper's sum) and f.pow(p) (not |f|^p) follow the authors'
    ``at()`` in szagoruyko/attention-transfer; the normalisation makes the difference irrelevant
    to the loss, and p = 2 is even."""
    return F.normalize(feature.float().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: list[Tensor], teacher: list[Tensor], p: float = 2.0) -> Tensor:
    """Σ_k mean((a(s_k) − a(t_k))²) over the already paired feature maps, unweighted.

    mean over batch × H·W as the authors' ``at_loss`` — the paper's "β divided by the number of
    elements in the attention map and batch size" (issue #32 of szagoruyko/attention-transfer).
    A larger map is average-pooled to the smaller one's size first (RepDistiller)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need equally many (>0) feature maps, got {len(student)} and {len(teacher)}")
    total = None
    for s, t in zip(student, teacher):
        s, t = pool_to_common_size(s.float(), t.float())
        term = (attention_map(s, p) - attention_map(t, p).detach()).pow(2).mean()
        total = term if total is None else total + term
    return total


@dataclass(frozen=True)
class ATConfig(MethodConfig):
    # p = 2: the authors' at() squares (`x.pow(2).mean(1)`), RepDistiller's Attention(p=2).
    p: float = 2.0
    # β = 1000: the authors' README command (`cifar.py --beta 1e+3`) and RepDistiller's `-b 1000`.
    beta: float = 1000.0
    # The authors' cifar.py adds `opt.beta * sum(loss_groups)`, RepDistiller `β · Σ` too: no /2.
    # The paper's eq. 2 writes β/2, and KD_methods_with_TF multiplies by beta/2 (β = 1e3): set
    # true for that convention (half the effective weight).
    beta_halved: bool = False


class AT(Method):
    name = "at"
    paper = ("Zagoruyko & Komodakis. Paying More Attention to Attention: Improving the Performance "
             "of Convolutional Neural Networks via Attention Transfer. ICLR 2017")
    display_name = "AT"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("szagoruyko/attention-transfer's at()/at_loss: channel mean of f², β = 1000 "
                     "without the paper's β/2 (beta_halved for it); stages paired by depth")
    Config = ATConfig
    student_taps = frozenset({STAGES})
    teacher_taps = frozenset({STAGES})

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        pairs = pair_stages(len(s.stages), len(t.stages))
        weight = self.config.beta / 2 if self.config.beta_halved else self.config.beta
        student = [s.stages[i] for i, _ in pairs]
        teacher = [t.stages[j] for _, j in pairs]
        return {"at": weight * at_loss(student, teacher, self.config.p)}
