"""The framework's overhead: kdbench's train() against a minimal hand-written PyTorch loop that
does the same arithmetic on the same data.

Both sides: the synthetic/tiny setting's data (kdbench.data.load_dataset, generated 16-px
images), its student (wrn_10_1) built from the same seed, its recipe's SGD and step schedule,
the same seeded batches and augmentation (crop with zero padding, flip), cross-entropy, the
training loss and accuracy summed on the device, and top-1/top-5 on the test split after the
epochs the recipe evaluates (``eval_every``, and the last). The hand-written loop is what one
would write for this without a framework: the augmentation by advanced indexing rather than
kdbench's gather, no hooks, no records, no checkpoints. That it really is the same arithmetic
is asserted: both must end every epoch with bit-identical losses and accuracies (fp32, one
CPU thread, deterministic).

Two ratios: per epoch (training + evaluation, what kdbench's history records as an epoch's
seconds) and per run (everything train() does — setup, per-epoch checkpoints, provenance —
against the whole hand-written script including its data loading and model building).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kdbench import settings
from kdbench.data import NORMALISATION, load_dataset
from kdbench.models import build_model
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions, train

SETTING = "synthetic/tiny"
SEED = 0
EPOCHS = 2
ROUNDS = 5
EVAL_BATCH = 1000


def hand_written_run(seed: int, epochs: int) -> list[dict[str, float]]:
    """The setting's student trained the plain-PyTorch way; one dict per epoch."""
    setting = settings.get(SETTING)
    recipe = setting.recipe
    padding = recipe.augmentation.crop_padding
    dataset = load_dataset(setting.dataset)
    torch.manual_seed(seed)
    model = build_model(setting.student, dataset.num_classes, dataset.in_channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    milestones = sorted({max(1, round(f * epochs)) for f in recipe.lr_decay_at})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, recipe.lr_decay)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALISATION[setting.dataset])
    scale, shift = 1.0 / (255.0 * std), -mean / std  # (x/255 - mean)/std as one multiply-add
    images, labels = dataset.train_images, dataset.train_labels
    n, height, width = len(labels), images.shape[2], images.shape[3]
    steps = n // recipe.batch_size + (1 if n % recipe.batch_size > 1 else 0)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        model.train()
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.long)
        seen = 0
        for step in range(steps):
            index = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            padded = F.pad(images[index].float(), (padding,) * 4)
            rows = (offsets[index, 0:1] + torch.arange(height))[:, :, None]
            cols = (offsets[index, 1:2] + torch.arange(width))[:, None, :]
            crops = padded[torch.arange(len(index))[:, None, None], :, rows, cols]  # (B, H, W, C)
            x = crops.permute(0, 3, 1, 2).contiguous()
            x = torch.where(flips[index].view(-1, 1, 1, 1), x.flip(3), x)
            x = x * scale + shift
            y = labels[index]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        scheduler.step()
        entry = {"loss": loss_sum.item() / seen, "train_top1": 100.0 * correct.item() / seen}
        if (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == epochs:  # the recipe's evaluations
            entry["top1"], entry["top5"] = evaluate(model, dataset.test_images, dataset.test_labels,
                                                    scale, shift)
        history.append({**entry, "seconds": time.perf_counter() - started})
    return history


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: Tensor, labels: Tensor, scale: Tensor,
             shift: Tensor) -> tuple[float, float]:
    model.eval()
    hits1 = hits5 = 0
    for start in range(0, len(labels), EVAL_BATCH):
        logits = model(images[start:start + EVAL_BATCH].float() * scale + shift)
        hits = logits.topk(5, dim=1).indices == labels[start:start + EVAL_BATCH, None]
        hits1 += hits[:, 0].sum()
        hits5 += hits.any(dim=1).sum()
    return 100.0 * int(hits1) / len(labels), 100.0 * int(hits5) / len(labels)


def test_train_loop_overhead(benchmark, interleave, report, tmp_path: Path) -> None:
    spec = RunSpec(SETTING, "vanilla", SEED, overrides={"epochs": EPOCHS})
    kdbench_histories: list[list[dict]] = []
    hand_histories: list[list[dict[str, float]]] = []

    def kdbench_run() -> None:
        # A fresh results directory per round: train() would otherwise resume the finished run.
        root = tmp_path / f"round-{len(kdbench_histories)}"
        record = train(spec, Store(root), TrainOptions(device="cpu"))
        kdbench_histories.append(record["history"])

    comparison = interleave(
        candidate=("kdbench", kdbench_run),
        baselines={"hand": lambda: hand_histories.append(hand_written_run(SEED, EPOCHS))},
        rounds=ROUNDS)

    # The same arithmetic: bit-identical epochs, every round.
    assert kdbench_histories and len(kdbench_histories) == len(hand_histories)
    for ours, theirs in zip(kdbench_histories, hand_histories):
        assert len(ours) == len(theirs) == EPOCHS
        for mine, reference in zip(ours, theirs):
            for key in ("loss", "train_top1", "top1", "top5"):
                assert mine.get(key) == reference.get(key), (key, mine, reference)

    measured = comparison.rounds()
    # Per-epoch seconds as each side measured them (training + evaluation, wall clock), paired
    # by round.
    epoch_ratio = statistics.median(
        sum(e["seconds"] for e in ours) / sum(e["seconds"] for e in theirs)
        for ours, theirs in zip(kdbench_histories[-measured:], hand_histories[-measured:]))
    # The whole run on CPU time (steady on a shared machine; it leaves out the fsync waits of
    # kdbench's checkpoints, which the wall-clock ratio beside it includes).
    report("run_ratio", comparison.ratio("kdbench", "hand", "cpu"),
           run_ratio_wall=round(comparison.ratio("kdbench", "hand", "wall"), 4),
           epoch_ratio_wall=round(epoch_ratio, 4), setting=SETTING, epochs=EPOCHS,
           kdbench_run_cpu_s=round(comparison.median("kdbench", "cpu"), 3),
           hand_run_cpu_s=round(comparison.median("hand", "cpu"), 3), rounds=measured, target=1.05)
