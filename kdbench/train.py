"""train(spec) -> record: the one training loop, readable top to bottom.

Setup, build, pre-training stages, main stage, evaluation, record — in that order, with every
hyperparameter coming from the setting's recipe (kdbench/settings.py) and every method
difference coming from the method's declared taps, modules, stages, loss and gradient rule.

The hot loop never synchronises with the host: loss sums, correct counts and the first
non-finite step are accumulated on the device and read once per epoch. A checkpoint is
written atomically after every epoch (models, method modules, optimiser, scheduler and every
RNG state), so a run killed at any point resumes from its last epoch and, on the CPU, ends
with exactly the history of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import random
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdbench
from kdbench import registry, settings, sources
from kdbench.data import BatchStream, Dataset, open_source, stream_of
from kdbench.errors import UserError
from kdbench.logs import EpochLog
from kdbench.method import (
    PREACT_STAGES,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    NormParameters,
    Progress,
    PretrainStage,
    iter_parameters,
)
from kdbench.models import build_model
from kdbench.roles import feature_points
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import Store, write_atomically
from kdbench.students import KEEP_LAST, KeptStudents
from kdbench.taps import FeatureTaps, as_float32

MAIN_STAGE = "main"
EVAL_BATCH = 1000

# The version of what this engine computes for a run: bump it in the commit that changes a
# run's result for an unchanged method and spec (data order, augmentation, optimiser, schedule,
# what a feature role returns, evaluation, ...), not for a refactor that leaves results equal.
# Every record stores it; `kdbench run` reports stored results made at another version as
# stale (kdbench/staleness.py). Version 1 is the first engine that recorded it: a record
# without the field was made by some earlier engine, which is not known to compute the same.
TRAINING_VERSION = 1


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class TrainOptions:
    device: str | None = None  # None: CUDA when present, else CPU
    compile: bool = False
    # Deterministic kernels on CUDA (torch.use_deterministic_algorithms, no cuDNN autotuning):
    # bit-identical reruns on the same GPU, at some speed. The CPU is deterministic anyway
    # (for the same thread count).
    deterministic: bool = False
    data_dir: Path | None = None
    threads: int | None = None  # CPU threads for this run (several runs share a machine)
    # DataLoader worker processes of an ImageFolder dataset (kdbench/imagefolder.py); None: one
    # per core, at most 8. Its batches do not depend on it. In-memory datasets use none.
    loader_workers: int | None = None
    # What the run keeps besides its record (kdbench.students, kdbench.logs): options of the
    # command, not of the run, since they change what is stored, never what is computed.
    keep: str = KEEP_LAST  # "last": the final student; "best": also the best epoch's
    tensorboard: bool = False  # also log each epoch to results/tensorboard/<id>/


ProgressCallback = Callable[[dict[str, Any]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str:
    """kdbench's own revision (its checkout's commit, else the installed version), never the
    git repository the user happens to run from (kdbench.revision)."""
    from kdbench.revision import kdbench_revision

    return kdbench_revision()


def pick_device(options: TrainOptions) -> torch.device:
    if options.device:
        return torch.device(options.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shapes_of(features: Features, model: nn.Module | None = None) -> FeatureShapes:
    """The shapes of a dry forward pass's features, for ``Method.build``.

    ``preact_norms`` (one entry per pre-activation stage collected) are the current (weight,
    bias) of the BNs that ``model``'s tap points name as the ones before the ReLU: a teacher's
    are its trained values, since the engine loads it before the dry pass."""
    def shapes(tensors: list[Tensor]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(f.shape[1:]) for f in tensors)

    return FeatureShapes(
        stages=shapes(features.stages),
        embedding=tuple(features.embedding.shape[1:]) if features.embedding is not None else (),
        num_classes=features.logits.shape[1],
        preact_stages=shapes(features.preact_stages),
        postact_stages=shapes(features.postact_stages),
        preact_norms=preact_norms(model, len(features.preact_stages)),
    )


def preact_norms(model: nn.Module | None, count: int) -> tuple[NormParameters | None, ...]:
    """Per pre-activation stage of ``model``, its named BN's (weight, bias) as floats, or None
    where its tap point names no BN (or the BN has no affine parameters)."""
    if count == 0:
        return ()
    if model is None:
        raise ValueError("shapes_of needs the model to read the pre-activation stages' BNs")
    points = feature_points(model)[PREACT_STAGES]
    if len(points) != count:
        raise ValueError(f"{count} pre-activation stages collected, {len(points)} tap points")
    norms: list[NormParameters | None] = []
    for point in points:
        norm = model.get_submodule(point.norm) if point.norm is not None else None
        if norm is None or norm.weight is None or norm.bias is None:
            norms.append(None)
            continue
        norms.append((tuple(norm.weight.detach().float().cpu().tolist()),
                      tuple(norm.bias.detach().float().cpu().tolist())))
    return tuple(norms)


def parameters_feeding(model: nn.Module, taps: FeatureTaps, stage: int, sample: Tensor,
                       role: str = STAGES) -> list[nn.Parameter]:
    """The parameters that the ``stage``-th tensor of ``role`` (stage outputs by default)
    depends on (FitNets' "up to the guided layer"), found by autograd rather than by an
    architecture's module names."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        features = taps.pop(model(sample))
        candidates = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(getattr(features, role)[stage].sum(), candidates, allow_unused=True)
    model.train(was_training)
    return [p for p, g in zip(candidates, grads) if g is not None]


def stage_overrides(stage: PretrainStage) -> dict[str, float]:
    """The recipe fields a pre-training stage sets for its own optimiser (weight decay, lr)."""
    overrides = {"weight_decay": stage.weight_decay, "lr": stage.lr}
    return {key: value for key, value in overrides.items() if value is not None}


def build_optimizer(parameters: list[nn.Parameter], recipe: settings.Recipe) -> torch.optim.SGD:
    # Weight decay on every parameter, BN included, as RepDistiller/mdistiller and the MHGD
    # reference do.
    return torch.optim.SGD(parameters, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: settings.Recipe, epochs: int,
                    schedule: str) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    scaled = settings.Recipe(epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                             lr_decay_at=recipe.lr_decay_at)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, scaled.milestones(), recipe.lr_decay)


@torch.no_grad()
def evaluate(model: nn.Module, stream: BatchStream, autocast: contextlib.AbstractContextManager,
             channels_last: bool) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) on the test split."""
    model.eval()
    correct1 = torch.zeros((), dtype=torch.long, device=stream.device)
    correct5 = torch.zeros((), dtype=torch.long, device=stream.device)
    total = 0
    for images, labels in stream.test_batches(EVAL_BATCH):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        total += len(labels)
    return 100.0 * correct1.item() / total, 100.0 * correct5.item() / total


# What checkpoint_here saves, and a resume reads. "threads" came later: a checkpoint without it
# resumes with the run's own thread count.
CHECKPOINT_KEYS = frozenset({"run_id", "stage_index", "epoch", "student", "method", "optimizer",
                             "scheduler", "stream", "rng", "history", "trained_seconds",
                             "images_seen"})


def load_checkpoint(path: Path, run_id: str) -> dict[str, Any] | None:
    """The checkpoint of run ``run_id``, or None (with a warning) when the file at ``path``
    belongs to another run, cannot be read or lacks what a resume needs: then the run starts
    over; nothing else is hurt."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        print(f"warning: ignoring unreadable checkpoint {path} ({type(error).__name__}); starting over",
              flush=True)
        return None
    if not isinstance(state, dict) or state.get("run_id") != run_id:
        print(f"warning: ignoring checkpoint {path}: it belongs to another run; starting over", flush=True)
        return None
    missing = sorted(CHECKPOINT_KEYS - state.keys())
    if missing:
        print(f"warning: ignoring checkpoint {path}: it lacks {', '.join(missing)}; starting over",
              flush=True)
        return None
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def train(spec: RunSpec, store: Store, options: TrainOptions = TrainOptions(),
          on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train one run to completion (resuming from its checkpoint) and return its record."""
    report = on_progress or (lambda event: None)
    started = time.time()
    # ---- setup -----------------------------------------------------------------------------
    setting = settings.for_spec(spec)
    is_teacher = spec.role == TEACHER
    base_recipe = setting.teacher_recipe if is_teacher else setting.recipe
    recipe = base_recipe.with_overrides(spec.overrides)
    device = pick_device(options)
    on_cuda = device.type == "cuda"
    precision = spec.precision  # part of the run's identity (kdbench.spec)
    if options.threads:
        torch.set_num_threads(options.threads)
    configure_kernels(on_cuda, options.deterministic)
    # bf16 autocast covers the networks' forward passes only: the loss terms are computed
    # outside it from fp32 copies of the features (taps.as_float32).
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    seed_everything(spec.seed)
    # The seeded batches (kdbench/data.py); the stream also says the data's classes, channels
    # and training-set size and labels.
    source = open_source(setting.dataset, setting.dataset_options, setting.train_subset,
                         options.data_dir)
    held_out = None  # the validation split (kdbench/validation.py), when the run holds one out
    if spec.held_out is not None:
        from kdbench import validation

        if not isinstance(source, Dataset):
            raise UserError(f"a validation split (--select-on val) is taken from in-memory data; "
                            f"{setting.dataset} is read from files (an ImageFolder)")
        source, held_out_set, held_out = validation.split(source, spec.held_out)
        # Evaluated as the test split is: its own stream, nothing trains on it.
        val_stream = BatchStream(held_out_set, device, recipe.batch_size, recipe.augmentation, spec.seed)
    stream = stream_of(source, device, recipe.batch_size, recipe.augmentation, spec.seed,
                       options.loader_workers)

    # ---- build -----------------------------------------------------------------------------
    method_class = registry.get(spec.method)
    method: Method = method_class(method_class.Config.from_json(spec.config))
    arch = setting.teacher if is_teacher else setting.student
    student = build_model(arch, stream.num_classes, stream.in_channels).to(device)
    teacher: nn.Module | None = None
    if method.uses_teacher and not is_teacher:
        from kdbench.teachers import load_teacher  # teachers.py imports train.py

        teacher = load_teacher(spec.teacher_spec(), setting, stream, store).to(device)
        teacher.eval().requires_grad_(False)
    if on_cuda:
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    student_taps = FeatureTaps(student, method.student_taps)
    teacher_taps = FeatureTaps(teacher, method.teacher_taps) if teacher is not None else None
    sample = stream.sample(2)
    with torch.no_grad():
        student.eval()
        student_shapes = shapes_of(student_taps.pop(student(sample)), student)
        teacher_shapes = shapes_of(teacher_taps.pop(teacher(sample)), teacher) if teacher is not None else None
    method.build(student_shapes, teacher_shapes, stream.num_train)
    method.to(device)
    method.observe_training_set(stream.train_labels.to(device))
    student_forward = torch.compile(student) if options.compile else student
    teacher_forward = torch.compile(teacher) if options.compile and teacher is not None else teacher

    def teacher_features(images: Tensor) -> Features | None:
        if teacher is None:
            return None
        # no_grad rather than inference_mode: methods feed teacher features into trainable
        # modules (MHGD's attention network), which must save them for backward.
        with torch.no_grad():
            return teacher_taps.pop(teacher_forward(images))

    stages: list[PretrainStage] = [] if is_teacher else method.pretrain_stages()
    stage_epochs = [max(1, round(stage.epochs * setting.pretrain_scale)) for stage in stages]
    pretrain_total = sum(stage_epochs)
    schedule = [(stage.name, epochs) for stage, epochs in zip(stages, stage_epochs)]
    schedule.append((MAIN_STAGE, recipe.epochs))

    # ---- resume ----------------------------------------------------------------------------
    checkpoint_path = store.checkpoint_path(spec.id)
    checkpoint = load_checkpoint(checkpoint_path, spec.id)
    history: list[dict[str, Any]] = []
    start_stage, start_epoch = 0, 0
    if checkpoint is not None:
        # The thread count it was made with: on the CPU the numbers depend on it (the order of
        # floating-point sums), and a resumed run must end as the uninterrupted one would.
        if checkpoint.get("threads"):
            torch.set_num_threads(checkpoint["threads"])
        student.load_state_dict(checkpoint["student"])
        method.load_state_dict(checkpoint["method"])
        history = checkpoint["history"]
        start_stage, start_epoch = checkpoint["stage_index"], checkpoint["epoch"]
    trained_seconds = checkpoint["trained_seconds"] if checkpoint else 0.0
    images_seen = checkpoint["images_seen"] if checkpoint else 0
    kept = KeptStudents(store, spec.id, options.keep)
    kept.resume(checkpoint, history)
    log = EpochLog(store, spec.id, options.tensorboard)
    log.start(history)  # a resumed run's logs are rewritten from its checkpoint's history

    def checkpoint_here(stage_index: int, epoch: int, optimizer, scheduler) -> None:
        """Everything a resumed run needs; optimiser None marks a stage boundary."""
        save_checkpoint(checkpoint_path, {
            "run_id": spec.id, "stage_index": stage_index, "epoch": epoch,
            "student": student.state_dict(), "method": method.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "stream": stream.state_dict(), "rng": rng_state(), "history": history,
            "trained_seconds": trained_seconds, "images_seen": images_seen,
            **kept.checkpoint_state(),
            "threads": torch.get_num_threads(),
        })

    # What progress displays count (kdbench.progress): every stage's epochs, and how many of
    # them the checkpoint had done (a resumed run).
    report({"event": "start", "schedule": schedule, "epochs": sum(epochs for _, epochs in schedule),
            "done": len(history)})

    # ---- stages ----------------------------------------------------------------------------
    for stage_index, (stage_name, epochs) in enumerate(schedule):
        if stage_index < start_stage:
            continue
        is_main = stage_name == MAIN_STAGE
        pretrain = None if is_main else stages[stage_index]
        run_student = is_main or pretrain.student_up_to_stage is not None
        if is_main:
            student_parameters = list(student.parameters())
            trainable = student_parameters + iter_parameters(method.trainable_modules())
            lr_schedule = "setting"
        else:
            student_parameters = (parameters_feeding(student, student_taps, pretrain.student_up_to_stage,
                                                     sample, pretrain.student_role)
                                  if run_student else [])
            trainable = student_parameters + iter_parameters(pretrain.modules)
            lr_schedule = pretrain.lr_schedule
        stage_recipe = recipe if is_main else recipe.with_overrides(stage_overrides(pretrain))
        optimizer = build_optimizer(trainable, stage_recipe)
        scheduler = build_scheduler(optimizer, recipe, epochs, lr_schedule)
        first_epoch = 0
        if checkpoint is not None and stage_index == start_stage:
            if checkpoint["optimizer"] is not None:  # None: saved at a stage boundary
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
            stream.load_state_dict(checkpoint["stream"])
            set_rng_state(checkpoint["rng"])
            first_epoch = start_epoch
        method_modules = method.trainable_modules() if is_main else pretrain.modules
        steps = stream.steps_per_epoch

        for epoch in range(first_epoch, epochs):
            epoch_started = time.time()
            student.train(run_student)
            method.eval()  # modules a stage trains are put in train mode just below
            for module in method_modules:
                module.train()
            loss_sum = torch.zeros((), device=device)
            term_sums: dict[str, Tensor] = {}
            first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            for step, (images, labels, index) in enumerate(stream.epoch()):
                if on_cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                batch = Batch(images, labels, index)
                progress = Progress(epoch, epochs, step, steps, pretrain_total if is_main else 0)
                with autocast:
                    t = teacher_features(images)  # once per batch, shared by all of its taps
                    if is_main:
                        logits = student_forward(images)
                        s = student_taps.pop(logits)
                    else:
                        s = student_taps.pop(student_forward(images)) if run_student else None
                # Losses, softmax with temperature, distances and attention maps in fp32.
                if is_main:
                    terms = {"ce": method.ce_weight * F.cross_entropy(logits.float(), labels)}
                    terms.update(method.loss(as_float32(s), as_float32(t), batch, progress))
                else:
                    terms = pretrain.loss(as_float32(s), as_float32(t), batch)
                optimizer.zero_grad(set_to_none=True)
                if is_main:
                    method.backward(terms, student_parameters, progress)
                else:
                    torch.stack(list(terms.values())).sum().backward()
                optimizer.step()
                # Device-side bookkeeping only: no .item() in the hot loop.
                total = torch.stack([term.detach().float() for term in terms.values()]).sum()
                # ``step`` as a Python scalar: a kernel argument, not a host-to-device copy.
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(total),
                                             step, first_bad_step)
                loss_sum += total * len(labels)
                for name, term in terms.items():
                    term_sums[name] = term_sums.get(name, 0.0) + term.detach().float() * len(labels)
                if is_main:
                    correct += (logits.detach().argmax(1) == labels).sum()
                seen += len(labels)
                if step % 20 == 0:
                    report({"event": "step", "stage": stage_name, "epoch": epoch + 1,
                            "epochs": epochs, "step": step + 1, "steps": steps})
            # ---- end of epoch: the one host sync --------------------------------------------
            bad_step = int(first_bad_step.item())
            if bad_step >= 0:
                raise NonFiniteLoss(f"loss became non-finite in stage {stage_name!r}, epoch "
                                    f"{epoch + 1}, step {bad_step + 1}")
            lr = optimizer.param_groups[0]["lr"]  # the one this epoch trained with
            scheduler.step()
            entry: dict[str, Any] = {
                "stage": stage_name, "epoch": epoch + 1, "loss": loss_sum.item() / seen,
                "terms": {name: value.item() / seen for name, value in term_sums.items()},
                "lr": lr, "lr_next": optimizer.param_groups[0]["lr"],
            }
            if is_main:
                entry["train_top1"] = 100.0 * correct.item() / seen
                if (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == epochs:
                    top1, top5 = evaluate(student_forward, stream, autocast, on_cuda)
                    entry.update(top1=top1, top5=top5)
                    if held_out is not None:
                        val_top1, val_top5 = evaluate(student_forward, val_stream, autocast, on_cuda)
                        entry.update(val_top1=val_top1, val_top5=val_top5)
            entry["seconds"] = time.time() - epoch_started
            trained_seconds += entry["seconds"]
            images_seen += seen
            history.append(entry)
            kept.observe(entry, student)  # a new best epoch's weights travel in the checkpoint
            checkpoint_here(stage_index, epoch + 1, optimizer, scheduler)
            log.epoch(history)
            report({"event": "epoch", **entry, "epochs": epochs})
        if stage_index + 1 < len(schedule):
            # The next stage starts at its epoch 0 with its own optimiser: checkpoint that
            # boundary so a resumed run does not repeat this stage.
            checkpoint_here(stage_index + 1, 0, None, None)
            checkpoint = None  # the next stage starts fresh in this process

    # ---- record ----------------------------------------------------------------------------
    student_taps.remove()
    if teacher_taps is not None:
        teacher_taps.remove()
    log.close()
    main = [entry for entry in history if entry["stage"] == MAIN_STAGE and "top1" in entry]
    best = max(main, key=lambda entry: entry["top1"])
    record: dict[str, Any] = {
        "id": spec.id,
        "status": "done",
        "spec": spec.to_json(),
        "setting": {**setting.to_json(), "recipe": {**setting.to_json()["teacher_recipe" if is_teacher else "recipe"], **spec.overrides},
                    "num_classes": stream.num_classes, "in_channels": stream.in_channels,
                    "pretrain_epochs": stage_epochs},
        "config": method.config.to_json(),
        "metrics": {"top1_last": main[-1]["top1"], "top5_last": main[-1]["top5"],
                    "top1_best": best["top1"], "top5_best": best["top5"], "best_epoch": best["epoch"],
                    **(validation_metrics(main) if held_out is not None else {})},
        "history": history,
        **({"validation": held_out.to_json()} if held_out is not None else {}),
        "error": None,
        "wall_seconds": time.time() - started,
        "train_seconds": trained_seconds,
        "images_per_second": images_seen / trained_seconds if trained_seconds else None,
        "extra_parameters": method.extra_parameters(),
        # The teacher's run uses the student-alone method, but its row is the teacher's.
        "method_display_name": "Teacher" if is_teacher else method.configured_display_name(),
        "provenance": provenance(method_class, device, precision, options.deterministic),
    }
    if is_teacher:
        from kdbench.teachers import save_teacher_weights

        record["teacher_weights"] = save_teacher_weights(student, spec, store)
    record["student_weights"] = kept.keep(student, main[-1]["epoch"], best["epoch"],
                                          last=record.get("teacher_weights"))
    return record


def validation_metrics(main: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation accuracy at the last epoch and at the best validation epoch, for the
    record's metrics beside the test accuracy (kdbench/validation.py)."""
    best = max(main, key=lambda entry: entry["val_top1"])
    return {"val_top1_last": main[-1]["val_top1"], "val_top5_last": main[-1]["val_top5"],
            "val_top1_best": best["val_top1"], "val_top5_best": best["val_top5"],
            "val_best_epoch": best["epoch"]}


def configure_kernels(on_cuda: bool, deterministic: bool) -> None:
    """The process's kernel choices for a run (a run owns its process)."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when it starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an operation with no deterministic kernel (on CUDA, e.g. some pooling
        # backward passes) warns, naming itself, instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    if on_cuda:
        # cuDNN's autotuner picks the fastest kernels for fixed shapes, but not reproducibly.
        torch.backends.cudnn.benchmark = not deterministic
        # No TF32: fp32 means fp32. The networks' speed comes from bf16 autocast; what runs
        # outside it is the losses, whose Gram matrices, distances and eigendecompositions
        # need fp32's 24-bit mantissa, not TF32's 10 bits (cuDNN's default is TF32).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def provenance(method_class: type[Method], device: torch.device, precision: str,
               deterministic: bool = False) -> dict[str, Any]:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    return {
        "kdbench_version": kdbench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": f"{device.type}: {device_name}",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "deterministic": deterministic,
        **method_provenance(method_class),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def method_provenance(method_class: type[Method]) -> dict[str, Any]:
    """What says which method code made a record: its source hashes (kdbench/sources.py), its
    declared fidelity, the distribution that installed it, and the engine's version."""
    hashes = sources.file_hashes(method_class)
    distribution, distribution_version = registry.distribution_of(method_class)
    return {
        "method_source_sha256": sources.combined_sha256(hashes),
        "method_source_files": hashes,
        "fidelity": getattr(method_class, "fidelity", None),
        "fidelity_note": getattr(method_class, "fidelity_note", None),
        "method_distribution": distribution,
        "method_distribution_version": distribution_version,
        "training_version": TRAINING_VERSION,
    }
