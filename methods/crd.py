"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020
(arXiv 1910.10699). The reference is the authors' code, HobbitLong/RepDistiller:
``crd/criterion.py`` (CRDLoss, ContrastLoss, Embed), ``crd/memory.py`` (ContrastMemory),
``dataset/cifar100.py`` (CIFAR100InstanceSample, which draws the negatives) and
``train_student.py`` / ``scripts/run_cifar_distill.sh`` (the CIFAR-100 settings).

Student and teacher embeddings (the classifier's input) are each mapped by a linear layer to a
128-d unit vector. A memory bank over the whole training set keeps, for every sample, a unit
vector for each network (indexed by ``Batch.index``). For each sample of the batch, the
positive is its own entry and K negatives are entries of other samples; the NCE critic of the
paper's eq. 18 scores a pair by h = P/(P + K/N) with P = exp(v·m/τ)/Z, and the loss is the NCE
objective −log h(positive) − Σ log(1 − h(negative)), summed over the K negatives, averaged
over the batch, taken both ways: the student's vector against the teacher's memory and the
teacher's vector against the student's memory. After the step's scores, each positive's entry
moves to normalise(m·entry + (1 − m)·v) (momentum m = 0.5).

Where this file differs from the reference, or makes a choice it leaves open:

- Negatives: i.i.d. uniform draws (with replacement) from the samples of the *other* classes,
  the set RepDistiller's CIFAR sampler uses (``mode='exact'``: positive = the sample itself,
  negatives from ``cls_negative[target]``). RepDistiller's ``np.random.choice`` draws without
  replacement when K is at most that set's size (16384 of 49 500 on CIFAR-100: it avoids the
  ≈ 15 % repeats that i.i.d. draws have); i.i.d. draws are the NCE estimator's noise samples
  as the paper's derivation assumes, and cost a fraction of a per-row sort. ``negative_pool =
  "uniform"`` draws from the whole training set instead (ContrastMemory's own AliasMethod
  over uniform unigrams, used when no indices are given). Draws come from torch's global
  generator (seeded and checkpointed by the engine), on the device, without a host sync.
- Normalisation constants Z: as the reference, set once from the first batch (mean of
  exp(v·m/τ) times N) and kept; in a buffer, so a resumed run keeps them.
- The loss is computed in log space: −log h = softplus(log(K/N + ε) − log P) and
  −log(1 − h) = log(K/N + ε) − log(K/N) + softplus(log P − log(K/N + ε)), which are the
  reference's ``ContrastLoss`` expressions (ε = 1e-7 included) without exp/divide/log round
  trips (tests/test_crd.py checks the two against each other).
- The memory-bank scores: where the bank is small against the number of draws (CIFAR: N =
  50 000, B·(K + 1) ≈ 10⁶) the scores are read off one product v·Memoryᵀ (B × N), a dense
  matrix product, instead of gathering B·(K + 1) rows of 128 floats (537 MB per bank per step
  at batch 64): the same numbers, ≈ 13× less CPU time here. Large banks (ImageNet) gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    EMBEDDING,
    FIDELITY_AUTHORS_CODE,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    Progress,
)

NEGATIVE_POOLS = ("other_classes", "uniform")
EPSILON = 1e-7  # crd/criterion.py: eps = 1e-7 in ContrastLoss
# Scores from the dense product v·Memoryᵀ when N ≤ this × (K + 1); else gathered rows. Measured
# (one CPU thread, B = 64, K = 16384, D = 128, forward + backward): dense 145 ms for N = 50 000
# against 1860 ms gathered, i.e. the dense product costs ≈ 40× less per memory row than a
# gathered row; 16 leaves a margin for devices where gathers are cheaper.
DENSE_SCORES_MAX_RATIO = 16
UNSET = -1.0  # a normalisation constant not yet set (the reference's params[2:4] = -1)


class _DenseBankScores(torch.autograd.Function):
    """anchors[b]·memory[indices[b, k]] read off the dense product anchors·memoryᵀ (B × N).

    Its backward needs the memory as it was in forward, and the step updates the bank in place
    (``momentum_update``) before backward runs, at the rows ``positives`` only. Rather than
    keeping a copy of the whole bank (25 MB per bank per step on CIFAR, ≈ 12 ms to make), the
    forward keeps those B rows as they were, and the backward corrects the product:
    G·M_old = G·M_now − G[:, positives]·(M_now[positives] − M_old[positives])."""

    @staticmethod
    def forward(ctx, anchors: Tensor, memory: Tensor, indices: Tensor, positives: Tensor) -> Tensor:
        ctx.save_for_backward(indices, positives, memory.index_select(0, positives))
        ctx.memory = memory  # by reference: changed, before backward, at ``positives`` only
        return (anchors @ memory.t()).gather(1, indices)

    @staticmethod
    def backward(ctx, grad_scores: Tensor):
        indices, positives, rows_then = ctx.saved_tensors
        memory = ctx.memory
        dense = torch.zeros(grad_scores.shape[0], memory.shape[0], dtype=grad_scores.dtype,
                            device=grad_scores.device).scatter_add_(1, indices, grad_scores)
        grad = dense @ memory
        changed = memory.index_select(0, positives) - rows_then
        grad = grad - dense.index_select(1, positives) @ changed
        return grad, None, None, None


def uses_dense_scores(num_train: int, draws: int) -> bool:
    """Whether the scores come from the dense product (module docstring)."""
    return num_train <= DENSE_SCORES_MAX_RATIO * draws


def memory_scores(memory: Tensor, anchors: Tensor, indices: Tensor, positives: Tensor) -> Tensor:
    """(B, K+1) dot products anchors[b]·memory[indices[b, k]], no gradient to the memory; the
    caller may update the memory rows ``positives`` in place before the backward pass.

    Dense product then a gather when the bank is small against the draws, else a gather of
    the rows and a batched product (module docstring); the two give the same numbers."""
    memory = memory.detach()
    if uses_dense_scores(memory.shape[0], indices.shape[1]):
        return _DenseBankScores.apply(anchors, memory, indices, positives)
    rows = memory.index_select(0, indices.flatten()).view(*indices.shape, memory.shape[1])
    return torch.bmm(rows, anchors.unsqueeze(2)).squeeze(2)


def nce_loss(log_p: Tensor, num_train: int) -> Tensor:
    """The NCE objective of eq. 18 (crd/criterion.py ContrastLoss) from log P (B, K+1), whose
    column 0 is the positive and columns 1..K the negatives, noise P_n = 1/N:
    −(Σ_b log h_b0 + Σ_b Σ_k log(1 − h_bk)) / B, h = P/(P + K·P_n + ε), 1 − h as the reference
    writes it, K·P_n/(P + K·P_n + ε)."""
    negatives = log_p.shape[1] - 1
    noise = negatives / num_train  # K·P_n
    log_c = math.log(noise + EPSILON)
    positive = F.softplus(log_c - log_p[:, 0])  # −log h
    negative = (log_c - math.log(noise)) + F.softplus(log_p[:, 1:] - log_c)  # −log(1 − h)
    return (positive.sum() + negative.sum()) / log_p.shape[0]


def momentum_update(memory: Tensor, index: Tensor, vectors: Tensor, momentum: float) -> Tensor:
    """memory[index] ← normalise(m·memory[index] + (1 − m)·vectors), in place (crd/memory.py)."""
    rows = memory.index_select(0, index) * momentum + vectors.detach() * (1.0 - momentum)
    rows = rows / rows.norm(dim=1, keepdim=True)  # the reference divides by the norm, no ε
    return memory.index_copy_(0, index, rows)


@dataclass(frozen=True)
class CRDConfig(MethodConfig):
    # RepDistiller train_student.py: --feat_dim 128, --nce_k 16384, --nce_t 0.07, --nce_m 0.5;
    # mdistiller CRD.FEAT.DIM 128, CRD.NCE.K 16384, TEMPERATURE 0.07, MOMENTUM 0.5: the same.
    feat_dim: int = 128
    negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    # RepDistiller's CIFAR-100 command `--distill crd -a 0 -b 0.8` (CE weight 1, `-r` default);
    # mdistiller CRD.LOSS.FEAT_WEIGHT 0.8, CE_WEIGHT 1.0.
    weight: float = 0.8
    # "other_classes": RepDistiller's CIFAR sampler (mode 'exact'); "uniform": the whole set.
    negative_pool: str = "other_classes"

    def __post_init__(self) -> None:
        if self.negative_pool not in NEGATIVE_POOLS:
            raise ValueError(f"crd.negative_pool must be one of {', '.join(NEGATIVE_POOLS)}, "
                             f"got {self.negative_pool!r}")
        if self.negatives < 1 or self.feat_dim < 1:
            raise ValueError("crd.negatives and crd.feat_dim must be >= 1")
        if not 0.0 <= self.momentum < 1.0 or not self.temperature > 0:
            raise ValueError("crd.momentum must be in [0, 1) and crd.temperature > 0")


class CRD(Method):
    name = "crd"
    paper = "Tian, Krishnan & Isola. Contrastive Representation Distillation. ICLR 2020"
    display_name = "CRD"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("RepDistiller (the authors' code): embeddings, memory bank, NCE loss, "
                     "defaults; negatives i.i.d. from other classes (RepDistiller: without "
                     "replacement)")
    Config = CRDConfig
    student_taps = frozenset({EMBEDDING})
    teacher_taps = frozenset({EMBEDDING})
    config: CRDConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("CRD needs a teacher")
        dim = self.config.feat_dim
        # Embed: Linear + L2 normalisation (crd/criterion.py), PyTorch's default init as there.
        self.embed_student = nn.Linear(math.prod(student_shapes.embedding), dim)
        self.embed_teacher = nn.Linear(math.prod(teacher_shapes.embedding), dim)
        self.num_train = num_train
        self.num_classes = student_shapes.num_classes
        # crd/memory.py: both banks uniform in ±1/√(D/3) (rows of norm ≈ 1), student's first.
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("student_memory", torch.rand(num_train, dim) * (2 * bound) - bound)
        self.register_buffer("teacher_memory", torch.rand(num_train, dim) * (2 * bound) - bound)
        # Z for the student-anchored and the teacher-anchored scores, set at the first step.
        self.register_buffer("normalizers", torch.full((2,), UNSET))
        # The training set's samples sorted by class, and where each class starts and how many
        # it has (observe_training_set): derived from the labels, so not checkpointed.
        self.register_buffer("by_class", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("class_start", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("class_count", torch.zeros(0, dtype=torch.long), persistent=False)

    def observe_training_set(self, labels: Tensor) -> None:
        if labels.shape != (self.num_train,):
            raise ValueError(f"crd: expected {self.num_train} training labels, got {tuple(labels.shape)}")
        counts = torch.bincount(labels, minlength=self.num_classes)
        # Once per run, outside the loop: a class with every sample has no other-class negative.
        if self.config.negative_pool == "other_classes" and int(counts.max()) >= self.num_train:
            raise ValueError("crd: negatives from other classes need a training set of two or more classes")
        device = self.student_memory.device
        self.by_class = torch.sort(labels, stable=True).indices.to(device)
        self.class_count = counts.to(device)
        self.class_start = (torch.cumsum(counts, 0) - counts).to(device)

    def contrast_indices(self, index: Tensor, labels: Tensor) -> Tensor:
        """(B, K+1) training-set indices: each sample's own (the positive), then K negatives."""
        shape = (index.shape[0], self.config.negatives)
        if self.config.negative_pool == "uniform":
            negatives = torch.randint(0, self.num_train, shape, device=index.device)
        else:
            if self.by_class.numel() != self.num_train:
                raise RuntimeError("crd: observe_training_set() was not called after build()")
            count = self.class_count[labels].unsqueeze(1)
            start = self.class_start[labels].unsqueeze(1)
            # Uniform over the N − count positions outside the class's block of ``by_class``:
            # a draw r maps to r before the block and r + count after it. r = ⌊u·n/2³²⌋ for a
            # 32-bit u (a multiply and a shift; an int64 modulo took twice the time): each r has
            # probability within n/2³² (1e-5 at CIFAR's n) of its share 1/n.
            draw = (torch.randint(0, 2**32, shape, device=index.device) * (self.num_train - count)) >> 32
            negatives = self.by_class[draw + (draw >= start) * count]
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def log_probabilities(self, scores: Tensor, which: int) -> Tensor:
        """log P = v·m/τ − log Z, Z set from this batch the first time (crd/memory.py)."""
        logits = scores / self.config.temperature
        with torch.no_grad():
            first = logits.exp().mean() * self.num_train
            normalizer = torch.where(self.normalizers[which] < 0, first, self.normalizers[which])
            self.normalizers[which] = normalizer
        return logits - normalizer.log()

    def loss(self, s: Features, t: Features | None, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        student = F.normalize(self.embed_student(s.embedding.flatten(1)), dim=1)
        teacher = F.normalize(self.embed_teacher(t.embedding.flatten(1)), dim=1)
        indices = self.contrast_indices(batch.index, batch.labels)
        # The student's vector against the teacher's bank, and the teacher's against the
        # student's (criterion.py: out_v1 = memory_v2 · v1 is the student side).
        student_anchored = self.log_probabilities(
            memory_scores(self.teacher_memory, student, indices, batch.index), 0)
        teacher_anchored = self.log_probabilities(
            memory_scores(self.student_memory, teacher, indices, batch.index), 1)
        loss = nce_loss(student_anchored, self.num_train) + nce_loss(teacher_anchored, self.num_train)
        # After the scores, as crd/memory.py: this step's scores see the banks before it.
        with torch.no_grad():
            momentum_update(self.student_memory, batch.index, student, self.config.momentum)
            momentum_update(self.teacher_memory, batch.index, teacher, self.config.momentum)
        return {"crd": self.config.weight * loss}
