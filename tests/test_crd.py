"""CRD (methods/crd.py): the NCE loss against RepDistiller's formulas, the memory bank, the
negatives, and a killed run that resumes bit for bit."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from kdbench import registry
from kdbench.method import Batch, FeatureShapes, Features, Progress
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.testing import check_method
from kdbench.train import train
from kdbench.worker import run_job
from kdbench.methods.crd import CRD, CRDConfig, memory_scores, momentum_update, nce_loss

PROGRESS = Progress(0, 2, 0, 1, 0)


def reference_contrast_loss(x: torch.Tensor, num_train: int, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller crd/criterion.py ContrastLoss, written out from its formulas: x (B, K+1)
    holds P = exp(v·m/τ)/Z, column 0 the positive."""
    batch, k = x.shape[0], x.shape[1] - 1
    noise = k / num_train
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / batch


def test_nce_loss_hand_computed() -> None:
    # P_pos = 1/2, P_neg = 1/4, K·P_n = 1/4 (K = 1, N = 4): −log(½/(½+¼)) − log(¼/(¼+¼)) = log 3.
    log_p = torch.log(torch.tensor([[0.5, 0.25]]))
    assert nce_loss(log_p, 4).item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_nce_loss_equals_the_reference_formula() -> None:
    torch.manual_seed(0)
    scores = torch.rand(5, 9) * 2 - 1  # cosines
    x = torch.exp(scores / 0.07) / 123.0  # P = exp(s/τ)/Z
    ours = nce_loss(scores / 0.07 - math.log(123.0), num_train=40)
    assert ours.item() == pytest.approx(reference_contrast_loss(x, 40).item(), rel=1e-5)


@pytest.mark.parametrize("num_train", [30, 10000])  # the dense-product and the gathered path
def test_memory_scores_and_their_gradient_despite_the_in_place_update(num_train: int) -> None:
    torch.manual_seed(0)
    memory = F.normalize(torch.randn(num_train, 6), dim=1)
    anchors = torch.randn(4, 6, requires_grad=True)
    indices = torch.randint(0, num_train, (4, 9))
    positives = torch.tensor([3, 7, 1, 0])
    weights = torch.randn(4, 9)
    before = memory.clone()
    scores = memory_scores(memory, anchors, indices, positives)
    momentum_update(memory, positives, torch.randn(4, 6), 0.5)  # before backward, as CRD.loss does
    (scores * weights).sum().backward()
    # Independent: the same dot products from the bank as it was, by einsum.
    direct = torch.einsum("bkd,bd->bk", before[indices], anchors.detach())
    assert torch.allclose(scores.detach(), direct, atol=1e-6)
    expected_grad = torch.einsum("bk,bkd->bd", weights, before[indices])
    assert torch.allclose(anchors.grad, expected_grad, atol=1e-5)


def test_momentum_update_hand_computed() -> None:
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    momentum_update(memory, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), 0.5)
    half = 1 / math.sqrt(2)
    assert torch.allclose(memory, torch.tensor([[half, half], [0.0, 1.0], [0.6, 0.8]]))


def built_crd(num_train: int = 24, num_classes: int = 3, **config) -> CRD:
    method = CRD(CRDConfig(**config))
    method.build(FeatureShapes((), (5,), num_classes), FeatureShapes((), (7,), num_classes), num_train)
    method.observe_training_set(torch.arange(num_train) % num_classes)
    return method


def test_negatives_come_from_the_other_classes_uniformly() -> None:
    torch.manual_seed(0)
    method = built_crd(num_train=24, num_classes=3, negatives=30000)
    index = torch.tensor([0, 4, 8])  # classes 0, 1, 2
    labels = index % 3
    indices = method.contrast_indices(index, labels)
    assert indices.shape == (3, 30001) and torch.equal(indices[:, 0], index)
    negatives = indices[:, 1:]
    assert not (negatives % 3 == labels[:, None]).any()
    for row, label in zip(negatives, labels):
        counts = torch.bincount(row, minlength=24).float()
        others = counts[torch.arange(24) % 3 != label]
        assert (others > 0).all()  # every other-class sample is drawn
        # 16 candidates, 30000 draws: each ≈ 1875 ± 42 (binomial sd); 6 sd is far from chance.
        assert (others - 30000 / 16).abs().max() < 6 * math.sqrt(30000 / 16 * (15 / 16))


def test_uniform_pool_draws_every_sample() -> None:
    torch.manual_seed(0)
    method = built_crd(num_train=24, num_classes=3, negatives=5000, negative_pool="uniform")
    negatives = method.contrast_indices(torch.tensor([0]), torch.tensor([0]))[0, 1:]
    assert torch.bincount(negatives, minlength=24).min() > 0


def test_negatives_follow_the_seeded_global_generator() -> None:
    method = built_crd()
    index, labels = torch.tensor([1, 2]), torch.tensor([1, 2])
    torch.manual_seed(5)
    first = method.contrast_indices(index, labels)
    torch.manual_seed(5)
    assert torch.equal(first, method.contrast_indices(index, labels))


def reference_crd_step(method: CRD, s: torch.Tensor, t: torch.Tensor, index: torch.Tensor,
                       indices: torch.Tensor):
    """CRD as RepDistiller's CRDLoss + ContrastMemory compute it, from the formulas: gathered
    rows, exp, Z from this first batch, ContrastLoss both ways; then the momentum update."""
    config, n = method.config, method.num_train
    v1 = F.normalize(method.embed_student(s), dim=1)
    v2 = F.normalize(method.embed_teacher(t), dim=1)
    memory_v1, memory_v2 = method.student_memory.clone(), method.teacher_memory.clone()
    out_v2 = torch.exp(torch.bmm(memory_v1[indices], v2[:, :, None]).squeeze(2) / config.temperature)
    out_v1 = torch.exp(torch.bmm(memory_v2[indices], v1[:, :, None]).squeeze(2) / config.temperature)
    z_v1, z_v2 = out_v1.mean().detach() * n, out_v2.mean().detach() * n
    loss = (reference_contrast_loss(out_v1 / z_v1, n) + reference_contrast_loss(out_v2 / z_v2, n))
    for memory, v in ((memory_v1, v1), (memory_v2, v2)):
        rows = memory[index] * config.momentum + v.detach() * (1 - config.momentum)
        memory[index] = rows / rows.norm(dim=1, keepdim=True)
    return config.weight * loss, memory_v1, memory_v2, torch.stack([z_v1, z_v2])


def test_crd_step_equals_the_reference_computation() -> None:
    torch.manual_seed(0)
    method = built_crd(num_train=24, num_classes=3, negatives=10)
    twin = built_crd(num_train=24, num_classes=3, negatives=10)
    twin.load_state_dict(method.state_dict())
    s, t = torch.randn(4, 5), torch.randn(4, 7)
    index = torch.tensor([5, 0, 13, 22])
    batch = Batch(torch.zeros(4, 3, 2, 2), index % 3, index)
    torch.manual_seed(1)
    terms = method.loss(Features(torch.zeros(4, 3), embedding=s), Features(torch.zeros(4, 3), embedding=t),
                        batch, PROGRESS)
    torch.manual_seed(1)
    indices = twin.contrast_indices(index, index % 3)
    expected, memory_v1, memory_v2, normalizers = reference_crd_step(twin, s, t, index, indices)
    assert set(terms) == {"crd"}
    assert terms["crd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(method.student_memory, memory_v1, atol=1e-6)
    assert torch.allclose(method.teacher_memory, memory_v2, atol=1e-6)
    assert torch.allclose(method.normalizers, normalizers, rtol=1e-5)
    ours = torch.autograd.grad(terms["crd"], list(method.embed_student.parameters()))
    theirs = torch.autograd.grad(expected, list(twin.embed_student.parameters()))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # Z is set once: a second step keeps it.
    method.loss(Features(torch.zeros(4, 3), embedding=s), Features(torch.zeros(4, 3), embedding=t),
                batch, PROGRESS)
    assert torch.allclose(method.normalizers, normalizers, rtol=1e-5)


def test_bank_and_constants_are_in_the_checkpoint() -> None:
    state = built_crd().state_dict()
    assert {"student_memory", "teacher_memory", "normalizers"} <= set(state)
    assert state["student_memory"].shape == (24, 128)
    assert "by_class" not in state  # derived from the labels at every start


def test_a_class_holding_every_sample_is_refused() -> None:
    method = CRD()
    method.build(FeatureShapes((), (5,), 2), FeatureShapes((), (5,), 2), 4)
    with pytest.raises(ValueError, match="two or more classes"):
        method.observe_training_set(torch.zeros(4, dtype=torch.long))


def test_contract() -> None:
    check_method("crd")


class Interrupt(BaseException):
    """Escapes the worker's error handling, like a kill between two epochs."""


def test_killed_crd_run_resumes_bit_for_bit(results_with_teacher, tmp_path) -> None:
    fresh = tmp_path / "fresh"
    shutil.copytree(results_with_teacher, fresh)
    # 1024 negatives rather than 16384: the same code paths, a third of the time.
    spec = RunSpec("synthetic/tiny", "crd", 0, config={"negatives": 1024})
    uninterrupted = train(spec, Store(fresh))

    def stop_after_first_epoch(event):
        if event["event"] == "epoch" and event["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_job(spec.to_json(), str(results_with_teacher), on_progress=stop_after_first_epoch)
    store = Store(results_with_teacher)
    checkpoint = torch.load(store.checkpoint_path(spec.id), weights_only=False)
    assert (checkpoint["method"]["normalizers"] > 0).all()  # set, and carried by the checkpoint
    epochs = []
    outcome = run_job(spec.to_json(), str(results_with_teacher),
                      on_progress=lambda e: e["event"] == "epoch" and epochs.append(e["epoch"]))
    assert outcome["status"] == "done" and epochs == [2]
    resumed = store.read(spec.id)
    strip = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]
    assert strip(resumed["history"]) == strip(uninterrupted["history"])
    assert resumed["metrics"] == uninterrupted["metrics"]


def test_two_epoch_runs_of_crd_and_crd_plus_kd(results_with_teacher) -> None:
    store = Store(results_with_teacher)
    crd = train(RunSpec("synthetic/tiny", "crd", 0), store)
    # The composition with a part's field set (1024 negatives: the same paths, less time).
    both = train(RunSpec("synthetic/tiny", "crd+kd", 0, config={"crd.negatives": 1024}), store)
    for record, terms in ((crd, {"ce", "crd"}), (both, {"ce", "crd", "kd"})):
        main = [entry for entry in record["history"] if entry["stage"] == "main"]
        assert [entry["epoch"] for entry in main] == [1, 2]
        assert set(main[0]["terms"]) == terms
        assert all(math.isfinite(value) for entry in main for value in entry["terms"].values())
    assert both["spec"]["method"] == "crd+kd" and both["id"] != crd["id"]
    assert (crd["method_display_name"], both["method_display_name"]) == ("CRD", "CRD + KD")
    assert {"methods/crd.py", "methods/kd.py", "kdbench/composition.py"} <= set(
        both["provenance"]["method_source_files"])
    assert both["config"]["kd.alpha"] == 1.0 and both["config"]["crd.weight"] == 0.8
    assert both["config"]["crd.negatives"] == 1024
    assert both["provenance"]["method_source_sha256"] == registry.source_sha256(registry.get("crd+kd"))
    assert both["provenance"]["method_source_sha256"] != crd["provenance"]["method_source_sha256"]
