"""DIST: Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022 (arXiv:2205.10536). The authors' loss: hunto/image_classification_sota
``lib/models/losses/dist_kd.py`` (linked from hunto/DIST_KD's README).

Instead of KL's exact match, the student matches the teacher's predictions up to a positive
affine map, through the Pearson distance d_p(u, v) = 1 − ρ(u, v):

- inter-class relation: for each sample, ρ between its student and teacher class
  distributions (rows of the B × C prediction matrices), averaged over the batch;
- intra-class relation: for each class, ρ between the student's and the teacher's
  probabilities of it across the batch (columns), averaged over the classes;

    L = α·CE + τ²·(β·(1 − mean_i ρ(Y^s_i, Y^t_i)) + γ·(1 − mean_j ρ(Y^s_:j, Y^t_:j))),
    Y = softmax(z / τ).

ρ is the cosine of the centred vectors with 1e-8 added to the product of norms (the authors'
``cosine_similarity``/``pearson_correlation``). Because ρ(a·u + b, v) = ρ(u, v) for a > 0, the
inter-class term is unchanged by a per-sample positive affine map of the predictions and the
intra-class term by a per-class one; the softmax makes both unchanged by a per-sample shift
of the logits. (A *scale* of the logits changes the softmax, so the loss is not invariant to
it: the invariance the paper claims is of the relation, on predictions.)

CIFAR-100 values β = γ = 2, τ = 4, α = 1: the authors' CIFAR run,
``configs/strategies/distill/dist_cifar.yaml`` of hunto/image_classification_sota (commit
6f7a70a): ``kd: dist_t4`` (τ = 4, β = γ = 1 inside the loss) times ``kd_loss_weight: 2``,
``ori_loss_weight: 1``. Their ImageNet setting is β = γ = τ = 1. tests/peers/test_dist.py
runs the authors' ``dist_kd.py`` beside this one on identical logits: loss and gradients agree
to fp32 rounding (tests/peers/RESULTS-mdistiller.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdbench.method import FIDELITY_AUTHORS_CODE, Batch, Features, Method, MethodConfig, Progress

PEARSON_EPS = 1e-8  # the authors' cosine_similarity


def pearson_rows(u: Tensor, v: Tensor) -> Tensor:
    """ρ between corresponding rows of u and v, (N,): cosine of the row-centred vectors."""
    u = u - u.mean(dim=1, keepdim=True)
    v = v - v.mean(dim=1, keepdim=True)
    return (u * v).sum(dim=1) / (u.norm(dim=1) * v.norm(dim=1) + PEARSON_EPS)


def inter_class_relation(student: Tensor, teacher: Tensor) -> Tensor:
    """1 − mean over samples of ρ(student_i, teacher_i), predictions (B, C)."""
    return 1 - pearson_rows(student, teacher).mean()


def intra_class_relation(student: Tensor, teacher: Tensor) -> Tensor:
    """1 − mean over classes of ρ(student_:j, teacher_:j), predictions (B, C)."""
    return inter_class_relation(student.t(), teacher.t())


def dist_terms(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(τ²·inter, τ²·intra) on softmax(z / τ), unweighted, in fp32."""
    student = (student_logits.float() / temperature).softmax(dim=1)
    teacher = (teacher_logits.float() / temperature).softmax(dim=1).detach()
    scale = temperature**2
    return scale * inter_class_relation(student, teacher), scale * intra_class_relation(student, teacher)


@dataclass(frozen=True)
class DISTConfig(MethodConfig):
    # CIFAR-100: β = γ = 2, τ = 4, CE weight α = 1 (module docstring on their source).
    beta: float = 2.0  # inter-class relation
    gamma: float = 2.0  # intra-class relation
    temperature: float = 4.0
    ce_weight: float = 1.0


class DIST(Method):
    name = "dist"
    paper = "Huang, You, Wang, Qian & Xu. Knowledge Distillation from A Stronger Teacher. NeurIPS 2022"
    display_name = "DIST"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("the authors' dist_kd.py and CIFAR config (β = γ = 2, τ = 4), checked "
                     "beside their code on identical logits (tests/peers/test_dist.py)")
    Config = DISTConfig
    config: DISTConfig

    @property
    def ce_weight(self) -> float:
        return self.config.ce_weight

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        inter, intra = dist_terms(s.logits, t.logits, self.config.temperature)
        return {"dist_inter": self.config.beta * inter, "dist_intra": self.config.gamma * intra}
