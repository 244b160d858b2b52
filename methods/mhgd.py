"""MHGD: Lee & Song, "Graph-based Knowledge Distillation by Multi-head Attention Network",
BMVC 2019 (arXiv 1907.02226). The first PyTorch port; specs/mhgd.md is its specification.

The reference is the authors' TensorFlow code, sseung0703/KD_methods_with_TF:
``nets/Relation.py`` (MHGD, Attention_head, Estimator, drop_head, kld_loss), ``nets/SVP.py``
(SVD_eid, Align_rsv, gradient_svd), ``op_util.py`` (Optimizer_w_MHGD, sigmoid) and
``train_w_distill.py`` (init_epoch, learning-rate schedule). "The reference" below means it.
Where it cannot serve (student and teacher widths that differ) the authors' later TF2 version,
sseung0703/Knowledge_distillation_via_TF2.0 @54403b6 (``nets/Relation.py``, ``op_util.py``
Multitask_Optimizer, ``nets/WResNet.py``), does.

At every sensing point, the *post-activation* output of each stage (``POSTACT_STAGES``, spec
§1: post-ReLU block outputs in the reference's ResNet, relu(bn(block output)) in the TF2
version's pre-activation WRN, whose ``feature`` list is exactly that), a feature map is
compressed to one unit vector per sample, its first right singular vector (spec §2). For each consecutive pair of sensing points a
multi-head attention network turns the batch's vectors into A graphs over the mini-batch (B×B:
how each back-end sample attends to the front-end samples). Stage 1 trains the attention
networks alone, on the teacher, to estimate the back-end vector from the front-end ones through
the graphs; stage 2 freezes them and trains the student to reproduce the teacher's graphs (a
KL divergence), each student parameter's transfer gradient clipped to its CE gradient's norm.

Where the spec leaves a choice, this file makes it as follows (each is commented where made):

- Pairing when stage counts differ (VGG has 4 sensing points, ResNet/WRN 3): the *last*
  min(L_s, L_t) points of each network, so both chains end at the feature map the classifier
  reads. Same counts: all points, as in the reference.
- Decomposition (kdbench/spectral.py, shared with other SVD-based methods): always the
  eigendecomposition of the smaller Gram matrix (XᵀX or XXᵀ), exact, batched, in fp32 with
  autocast off. The reference also uses the plain SVD when H·W and C are within a factor 3/2
  of each other; the result is the same decomposition.
- Its gradient is the exact SVD gradient (spec: "any exact method is fine"), with the
  1/(λ_i − λ_j) terms tamed near ties and NaN/inf zeroed (see kdbench/spectral.py). The
  reference's hand-written ``gradient_svd`` is exactly twice the exact gradient only when
  H·W ≥ C (its ``msym`` is X + Xᵀ where the formula has ½(X + Xᵀ)); for H·W < C (its
  ``left_grad``: the last stage of a WRN on 28-px input, VGG, ResNet×4) its direction differs
  too (kdbench/spectral.py gives the measured cosines, 0.977–0.9998 over a batch). The
  per-parameter clip to ‖∇CE‖ absorbs the factor whenever it is active, not the direction.
- Widths that differ (spec §2, the TF2 version's ``linear_map``): an FC (no bias) + BN from
  C_s to C_t on the student's *feature map*, before the decomposition. The TF2 FC acts on the
  NHWC map's channels and its BN normalises per channel over batch and positions: a 1×1 conv
  + BatchNorm2d here. Its variables are trained with the student and their transfer gradient
  is clipped like every student variable's (``backward``).
- Stage-1 regularisation: the reference regularises the attention networks only through the
  explicit 5e-4·Σ‖w‖² of its stage-1 loss (their layers have no regulariser of their own), so
  the stage's optimiser runs without weight decay (``PretrainStage.weight_decay = 0``).
- Stage-1 learning rate: the setting's optimiser at its initial rate, constant (the
  reference's schedule decays only after stage 1); its epochs are the method's own (40 ×
  the setting's pretrain_scale), in both the authors' recipe and the common recipe (spec §4).

Cost: the per-tensor clip needs ∇CE and ∇transfer of every student tensor apart, hence two
backward passes through the student (the reference computes the two gradients separately too);
the decompositions are eigh-bound. tests/benchmarks/test_mhgd_speed.py measures both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.method import (
    FIDELITY_AUTHORS_CODE,
    POSTACT_STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
    iter_parameters,
)
from kdbench.spectral import align_to_teacher, right_singular_vectors

TRANSFER = "graph_kl"  # the name of the transfer term, the one the gradient rule clips

# --- graphs and losses (spec §3, §4) ----------------------------------------------------------

def drop_heads(attention: Tensor) -> Tensor:
    """Keep head a for row i iff z[a, i] > mean over heads of z[:, i], z ~ N(0, 1): about half the
    heads of each sample are dropped, the kept weights are not rescaled (Relation.py drop_head)."""
    heads, rows = attention.shape[:2]
    noise = torch.randn(heads, rows, 1, device=attention.device, dtype=attention.dtype)
    return attention * (noise > noise.mean(dim=0, keepdim=True))


def graph_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(student ‖ teacher) between the row-softmaxes of tanh(graph logits), summed over heads,
    rows and columns, not averaged (Relation.py kld_loss on tanh(G_S), tanh(G_T))."""
    log_student = F.log_softmax(torch.tanh(student_logits), dim=-1)
    log_teacher = F.log_softmax(torch.tanh(teacher_logits), dim=-1)
    return (log_student.exp() * (log_student - log_teacher)).sum()


def transfer_bound_factor(main_epoch: int) -> float:
    """sigmoid(epoch − init_epoch) of op_util.py, with its rule that a value above 1 − 1e-8 is 1.
    The reference's epoch counts from the start of stage 1, so epoch − init_epoch is the
    main-stage epoch (0.5 in the first student epoch, ≈0.73 in the second, → 1)."""
    factor = 1.0 / (1.0 + math.exp(-main_epoch))
    return 1.0 if factor > 1.0 - 1e-8 else factor


def clipped(transfer_grads: list[Tensor], bound_grads: list[Tensor], factor: float) -> list[Tensor]:
    """clip_by_norm(transfer, ‖bound‖·factor) for each pair of tensors. ``tf.clip_by_norm(t, c)``
    is t·min(1, c/‖t‖): a zero transfer gradient stays zero and a zero bound clips to zero. The
    norms and scalings are batched over the tensors (``torch._foreach_*``), a few kernels per
    step rather than a few per tensor."""
    bounds = factor * torch.stack(torch._foreach_norm(bound_grads))
    norms = torch.stack(torch._foreach_norm(transfer_grads))
    scales = (bounds / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)
    return list(torch._foreach_mul(transfer_grads, list(scales.unbind())))


def clip_transfer_gradients(ce_grads: list[Tensor], transfer_grads: list[Tensor | None],
                            factor: float) -> list[Tensor]:
    """∇CE + clip_by_norm(∇transfer, ‖∇CE‖·factor), separately for each parameter tensor (op_util.py
    Optimizer_w_MHGD; the optimiser adds the weight decay). A tensor the transfer term does not
    reach (``None``) keeps ∇CE. Updates ``ce_grads`` in place."""
    reached = [index for index, grad in enumerate(transfer_grads) if grad is not None]
    if reached:
        ce = [ce_grads[index] for index in reached]
        transfer = [transfer_grads[index] for index in reached]
        torch._foreach_add_(ce, clipped(transfer, ce, factor))
    return ce_grads


def clip_projection_gradients(parameters: list[nn.Parameter], transfer_grads: list[Tensor | None],
                              factor: float, l2: float) -> list[Tensor]:
    """clip_by_norm(∇transfer, ‖∇R‖·factor) for each width-projection tensor, R = l2·Σ v² its
    regulariser, ∇R = 2·l2·v (the optimiser adds the engine's weight decay, as for every
    parameter). In the TF2 version (op_util.py Multitask_Optimizer, ``clipped=True``) every
    trained variable, student or projection, gets clip_by_norm(∇distill, ‖∇(CE + R)‖) + ∇(CE + R);
    CE does not reach a projection, so its bound is ‖∇R‖. ``factor`` is the student's ramp
    (``transfer_bound_factor``), so that one rule bounds both. A zero tensor (BN β at its
    initial 0) has a zero bound and, as in the reference, no transfer gradient."""
    grads = [grad if grad is not None else torch.zeros_like(parameter)
             for parameter, grad in zip(parameters, transfer_grads)]
    reached = [index for index, grad in enumerate(transfer_grads) if grad is not None]
    if reached:
        bounds = [2.0 * l2 * parameters[index].detach() for index in reached]
        for index, grad in zip(reached, clipped([grads[index] for index in reached], bounds, factor)):
            grads[index] = grad
    return grads


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # The reference's layers sit in ResNet_arg_scope: variance scaling, fan-out, factor 2 (a
    # truncated normal whose std is widened by √1.3 to compensate the truncation, i.e. the
    # variance of Kaiming-normal fan-out), and no bias unless a layer asks for a zero one.
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def width_projection(student_width: int, teacher_width: int) -> nn.Sequential:
    """The TF2 version's ``linear_map`` (Relation.py @54403b6): tcl.FC(C_t) without bias, then
    tcl.BatchNorm, on the student's NHWC feature map. Its FC multiplies the channel axis at
    every position (a 1×1 conv) and its BN normalises each channel over batch and positions
    (BatchNorm2d; decay 0.9, ε 1e-5 = PyTorch's momentum 0.1, eps 1e-5). The FC's initialiser
    is tcl.FC's variance scaling, factor 2, fan-out: Kaiming normal, fan-out, as ``_linear``."""
    conv = nn.Conv2d(student_width, teacher_width, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_width))


def _linear_bn(in_features: int, out_features: int) -> nn.Sequential:
    # BatchNorm with scale and centre, decay 0.9, ε 1e-5 in the reference's arg scope: PyTorch's
    # BatchNorm1d defaults (momentum 0.1 = 1 − decay).
    return nn.Sequential(_linear(in_features, out_features, bias=False),
                         nn.BatchNorm1d(out_features))


class AttentionNetwork(nn.Module):
    """One consecutive pair of sensing points, front (C_f) → back (C_b) (Relation.py
    Attention_head + Estimator). Per-head width D = (C_f + C_b) // 2."""

    def __init__(self, front_width: int, back_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.width = (front_width + back_width) // 2
        self.key = _linear_bn(back_width, heads * self.width)  # θ, on the back-end vectors
        self.query = _linear_bn(front_width, heads * self.width)  # φ, on the front-end vectors
        # The estimator: f1 = Linear + BN + ReLU on the front vectors, then the heads' aggregates
        # concatenated and mapped to C_b by a Linear with a zero-initialised bias.
        self.embed = nn.Sequential(_linear(front_width, self.width, bias=False),
                                   nn.BatchNorm1d(self.width), nn.ReLU())
        self.estimate_back = _linear(heads * self.width, back_width, bias=True)

    def logits(self, back: Tensor, front: Tensor) -> Tensor:
        """S (A, B, B), S_a = θ_a(V_back)·φ_a(V_front)ᵀ: row i is back sample i, column j front
        sample j. No 1/√D scaling (the reference has none). Splitting the A·D units into heads
        head-major rather than the reference's head-minor reshape is a permutation of units."""
        batch = back.shape[0]
        keys = self.key(back).view(batch, self.heads, self.width).transpose(0, 1)
        queries = self.query(front).view(batch, self.heads, self.width).transpose(0, 1)
        return keys @ queries.transpose(1, 2)

    def estimator_loss(self, front: Tensor, back: Tensor) -> Tensor:
        """mean over samples of 1 − ⟨V̂_back, V_back⟩, V̂_back estimated from the front vectors
        through the graphs with random head dropping (spec §3 estimator)."""
        batch = front.shape[0]
        attention = drop_heads(torch.softmax(self.logits(back, front), dim=-1))
        aggregated = attention @ self.embed(front)  # (A, B, D)
        estimate = self.estimate_back(aggregated.transpose(0, 1).reshape(batch, -1))
        estimate = F.normalize(estimate, dim=-1)
        return (1.0 - (estimate * back).sum(dim=-1)).mean()


# --- the method -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MHGDConfig(MethodConfig):
    # Paper §4 ablation: 1/2/4/8/16 heads → best at 8; Relation.py num_head = 8.
    heads: int = 8
    # train_w_distill.py: init_epoch = 40 for MHGD (100 student epochs after it). The engine
    # multiplies it by the setting's pretrain_scale.
    pretrain_epochs: int = 40
    # Relation.py: SVD_eid(sfm, 4) for the student, SVD_eid(tfm, 1) for the teacher.
    svd_student_vectors: int = 4
    # op_util.py Optimizer_w_MHGD: mha_loss += 5e-4·Σ v² over the attention networks' weights,
    # biases and BN γ/β (a coefficient on Σ‖w‖², whose gradient is 2·5e-4·w).
    attention_weight_decay: float = 5e-4
    # TF2 @54403b6 Relation.py: the width projections' FC kernel and BN γ/β carry
    # tf.keras.regularizers.l2(weight_decay), weight_decay = 5e-4 (train_w_distill.py), i.e.
    # R = 5e-4·Σ v², gradient 2·5e-4·v. Its gradient is what bounds their transfer gradient
    # (``MHGD.backward``); the decay itself is the engine's, as for every parameter.
    projection_l2: float = 5e-4


class MHGD(Method):
    name = "mhgd"
    paper = ("Lee & Song. Graph-based Knowledge Distillation by Multi-head Attention Network. "
             "BMVC 2019")
    display_name = "MHGD"
    fidelity = FIDELITY_AUTHORS_CODE
    fidelity_note = ("a port of the authors' TF code (sseung0703/KD_methods_with_TF; its TF2 "
                     "version for width projections) per specs/mhgd.md; the SVD gradient exact "
                     "where theirs is hand-written")
    Config = MHGDConfig
    # Post-activation stage outputs on both networks (spec §1; module docstring).
    student_taps = frozenset({POSTACT_STAGES})
    teacher_taps = frozenset({POSTACT_STAGES})
    # The decompositions (spec §2) are eigh, whose CUDA kernel reads cuSOLVER's error code on
    # the host: PyTorch has no eigh variant without that check. Once per sensing point per step.
    host_syncs = {"aten._linalg_eigh": "the singular vectors come from torch.linalg.eigh, which "
                                       "checks cuSOLVER's error code on the host"}
    config: MHGDConfig

    def build(self, student_shapes: FeatureShapes, teacher_shapes: FeatureShapes | None,
              num_train: int) -> None:
        if teacher_shapes is None:
            raise ValueError("MHGD needs a teacher")
        # Pairing: the last min(L_s, L_t) sensing points of each network (module docstring).
        student_stages, teacher_stages = student_shapes.postact_stages, teacher_shapes.postact_stages
        count = min(len(student_stages), len(teacher_stages))
        if count < 2:
            raise ValueError("MHGD needs at least two post-activation stage outputs in each network")
        self.student_points = list(range(len(student_stages)))[-count:]
        self.teacher_points = list(range(len(teacher_stages)))[-count:]
        student_widths = [student_stages[i][0] for i in self.student_points]
        self.teacher_widths = [teacher_stages[i][0] for i in self.teacher_points]
        # The attention networks live in the teacher's widths: they are trained on the
        # teacher's vectors, and G_T uses the teacher's vectors with no projection.
        self.attention = nn.ModuleList(
            AttentionNetwork(front, back, self.config.heads)
            for front, back in zip(self.teacher_widths[:-1], self.teacher_widths[1:]))
        self.projections = nn.ModuleDict({
            str(point): width_projection(student, teacher)
            for point, (student, teacher) in enumerate(zip(student_widths, self.teacher_widths))
            if student != teacher})

    # ---- features → vectors --------------------------------------------------------------------

    def teacher_vectors(self, t: Features) -> list[Tensor]:
        """V_T per sensing point: the first right singular vector, (B, C_t), no gradient."""
        with torch.no_grad():
            return [right_singular_vectors(t.postact_stages[i], 1)[..., 0] for i in self.teacher_points]

    def student_vectors(self, s: Features, teacher: list[Tensor]) -> list[Tensor]:
        """V_S per sensing point: the candidates of the student's map (projected to the teacher's
        width first where the widths differ), aligned to the teacher's vector, (B, C_t)."""
        vectors = []
        for point, (index, target) in enumerate(zip(self.student_points, teacher)):
            feature_map = s.postact_stages[index]
            if str(point) in self.projections:
                feature_map = self.projections[str(point)](feature_map)
            candidates = right_singular_vectors(feature_map, self.config.svd_student_vectors)
            vectors.append(align_to_teacher(candidates, target))
        return vectors

    def graph_logits(self, vectors: list[Tensor]) -> Tensor:
        """Every module's graph logits (M, A, B, B) for one network's vectors."""
        return torch.stack([network.logits(back, front) for network, front, back
                            in zip(self.attention, vectors[:-1], vectors[1:])])

    # ---- stage 1: the attention networks on the teacher --------------------------------------

    def pretrain_stages(self) -> list[PretrainStage]:
        if self.config.pretrain_epochs == 0:
            return []  # untrained attention networks: an ablation, not the method
        # lr_schedule "constant": train_w_distill.py's learning_rate_scheduler decays only at
        # init_epoch + 30/60/80 % of the student epochs, so stage 1 runs at the initial rate.
        return [PretrainStage(name="attention", epochs=self.config.pretrain_epochs,
                              loss=self.estimator_loss, modules=[self.attention],
                              student_up_to_stage=None, lr_schedule="constant", weight_decay=0.0)]

    def estimator_loss(self, s: Features | None, t: Features, batch: Batch) -> dict[str, Tensor]:
        self.attention.requires_grad_(True)
        with torch.autocast(t.logits.device.type, enabled=False):
            vectors = self.teacher_vectors(t)
            estimator = torch.stack([network.estimator_loss(front, back) for network, front, back
                                     in zip(self.attention, vectors[:-1], vectors[1:])]).sum()
            # Replaces the optimiser's weight decay for this stage (weight_decay=0 above).
            l2 = self.config.attention_weight_decay * torch.stack(
                [p.square().sum() for p in self.attention.parameters()]).sum()
        return {"estimator": estimator, "attention_l2": l2}

    # ---- stage 2: the student ------------------------------------------------------------------

    def trainable_modules(self) -> list[nn.Module]:
        # Only the projections: the attention networks are frozen (and in eval mode) in stage 2.
        return [self.projections]

    def loss(self, s: Features, t: Features | None, batch: Batch,
             progress: Progress) -> dict[str, Tensor]:
        # Frozen: no gradient for their parameters, but gradients flow through them to V_S.
        self.attention.requires_grad_(False)
        with torch.autocast(s.logits.device.type, enabled=False):
            teacher = self.teacher_vectors(t)
            with torch.no_grad():
                teacher_logits = self.graph_logits(teacher)
            student_logits = self.graph_logits(self.student_vectors(s, teacher))
            return {TRANSFER: graph_kl(student_logits, teacher_logits)}

    def backward(self, terms: Mapping[str, Tensor], student_parameters: list[nn.Parameter],
                 progress: Progress) -> None:
        """g = ∇CE + clip_by_norm(∇transfer, ‖∇CE‖·sigmoid(epoch)) per student parameter tensor
        (op_util.py Optimizer_w_MHGD clips each variable's gradient separately); the width
        projections' transfer gradient is clipped the same way, to ‖∇R‖·sigmoid(epoch) of their
        regulariser R (``clip_projection_gradients``); any other term is added unclipped. Two
        backward passes over one graph: the clip needs ∇CE and ∇transfer of every tensor apart."""
        student = [p for p in student_parameters if p.requires_grad]
        extra = [p for p in iter_parameters(self.trainable_modules()) if p.requires_grad]
        others = [term for name, term in terms.items() if name not in ("ce", TRANSFER)]
        transfer_grads = torch.autograd.grad(terms[TRANSFER], student + extra, retain_graph=True,
                                             allow_unused=True)
        ce_grads = torch.autograd.grad(terms["ce"], student, retain_graph=bool(others),
                                       allow_unused=True)
        ce_grads = [grad if grad is not None else torch.zeros_like(parameter)
                    for parameter, grad in zip(student, ce_grads)]
        factor = transfer_bound_factor(progress.epoch)
        grads = clip_transfer_gradients(ce_grads, list(transfer_grads[:len(student)]), factor)
        grads += clip_projection_gradients(extra, list(transfer_grads[len(student):]), factor,
                                           self.config.projection_l2)
        for parameter, grad in zip(student + extra, grads):
            parameter.grad = grad
        if others:
            for parameter, grad in zip(student + extra, torch.autograd.grad(
                    torch.stack(others).sum(), student + extra, allow_unused=True)):
                if grad is not None:
                    parameter.grad = grad if parameter.grad is None else parameter.grad + grad
