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
import json
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
from kdbench import distributed, registry, settings, sources
from kdbench.data import BatchStream, Dataset, fingerprint, open_source, stream_of
from kdbench.errors import UserError
from kdbench.logs import EpochLog
from kdbench.memory import ActivationCounter, fits, parameter_bytes
from kdbench.method import (
    EMBEDDING,
    POSTACT_STAGES,
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


def group_key(spec: RunSpec) -> tuple:
    """What the runs of one group share: the setting, the batches (seed, recipe overrides,
    precision, the held-out validation split) and the teacher (its seed and checkpoint). Runs with one key see the same
    batches and the same frozen teacher, so one teacher forward per batch serves them all."""
    return (spec.setting, spec.role, spec.seed, spec.precision, spec.teacher_seed,
            spec.teacher_checkpoint, json.dumps(spec.overrides, sort_keys=True), spec.held_out,
            spec.setting_sha256)


def train(spec: RunSpec, store: Store, options: TrainOptions = TrainOptions(),
          on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train one run to completion (resuming from its checkpoint) and return its record: a
    group of one, through the same loop as a group."""
    report = on_progress or (lambda event: None)
    outcome = train_group([spec], store, options, lambda _, event: report(event))[spec.id]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


GroupProgress = Callable[[RunSpec, dict[str, Any]], None]
# Called once per run as soon as it has ended: its record, or the exception that failed it.
RunFinished = Callable[[RunSpec, "dict[str, Any] | Exception"], None]


@dataclass
class TrainingRun:
    """One run of a group: everything a solo run owns (model, method, optimiser, scheduler,
    its global-RNG state, checkpoint, history, logs), and where it is in its schedule."""

    spec: RunSpec
    method_class: type[Method]
    method: Method
    student: nn.Module
    student_forward: nn.Module
    student_taps: FeatureTaps
    stream: BatchStream
    stages: list[PretrainStage]
    stage_epochs: list[int]
    schedule: list[tuple[str, int]]
    checkpoint_path: Path
    checkpoint: dict[str, Any] | None  # the one resumed from, until its stage has started
    history: list[dict[str, Any]]
    stage_index: int
    epoch: int  # the next epoch of the current stage, from 0
    rng: dict[str, Any]  # torch/numpy/python (and CUDA) RNG state, swapped in for its steps
    threads: int
    trained_seconds: float
    images_seen: int
    kept: KeptStudents
    log: EpochLog
    sample: Tensor
    report: Callable[[dict[str, Any]], None]
    # Its device memory, for the split of a group that would not fit the GPU (kdbench.memory).
    parameter_bytes: int
    activation_bytes: int
    val_stream: BatchStream | None = None  # the held-out validation split's, if any
    # Its process group (kdbench/distributed.py): SOLO for a run of one process. A run of
    # several has ``ddp``, its student under DistributedDataParallel (``student_forward``
    # calls it), and per stage the parameters whose gradients train_step averages itself.
    ranks: distributed.Ranks = distributed.SOLO
    ddp: nn.Module | None = None
    # The sha256 of the teacher weights it distils from (None: no teacher): its record's
    # provenance names them, so a student of a retrained teacher is told apart.
    teacher_weights_sha256: str | None = None
    data_sha256: str | None = None  # the data it trained on (kdbench.data.fingerprint)
    ddp_syncs: bool = False  # DDP averages the student's gradients in this stage's backward
    averaged_parameters: list[nn.Parameter] | None = None
    # The current stage's state, made when the stage starts (``start_stage``).
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    student_parameters: list[nn.Parameter] | None = None
    method_modules: list[nn.Module] | None = None
    # The current epoch's device-side sums (``start_epoch``).
    epoch_started: float = 0.0
    loss_sum: Tensor | None = None
    term_sums: dict[str, Tensor] | None = None
    first_bad_step: Tensor | None = None
    correct: Tensor | None = None
    seen: int = 0

    @property
    def stage_name(self) -> str:
        return self.schedule[self.stage_index][0]

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files: a run's rank 0 (every solo run)."""
        return self.ranks.is_writer

    @property
    def is_main(self) -> bool:
        return self.stage_name == MAIN_STAGE

    @property
    def pretrain(self) -> PretrainStage | None:
        return None if self.is_main else self.stages[self.stage_index]

    @property
    def run_student(self) -> bool:
        return self.is_main or self.pretrain.student_up_to_stage is not None

    @property
    def pretrain_total(self) -> int:
        return sum(self.stage_epochs)

    @property
    def epochs_done(self) -> int:
        """Epochs finished over all stages: the run furthest behind trains first."""
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.stage_index == len(self.schedule) - 1 and self.epoch >= self.schedule[-1][1]

    def batch_position(self) -> tuple[bytes, int]:
        """What decides the batches of its next epoch: its stream's generator state (the seed
        and the epochs drawn so far) and, on the CPU, its thread count (the order of the
        teacher's floating-point sums). Runs at one position share every batch."""
        return bytes(self.stream.generator.get_state().numpy()), self.threads


@contextlib.contextmanager
def rng_of(run: TrainingRun):
    """Run the block with ``run``'s global RNG state, and keep what the block left of it: a
    run's steps draw (dropout, sampling) exactly as they would alone."""
    set_rng_state(run.rng)
    try:
        yield
    finally:
        run.rng = rng_state()


def restricted(features: Features | None, roles: frozenset[str]) -> Features | None:
    """``features`` with only ``roles`` filled, as a run alone would collect them: the group's
    teacher taps are the union of its runs' roles."""
    if features is None:
        return None
    return Features(
        logits=features.logits,
        stages=features.stages if STAGES in roles else [],
        embedding=features.embedding if EMBEDDING in roles else None,
        preact_stages=features.preact_stages if PREACT_STAGES in roles else [],
        postact_stages=features.postact_stages if POSTACT_STAGES in roles else [],
    )


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this process so far: on CUDA the tensors' (max_memory_allocated), on
    the CPU the resident set (ru_maxrss, which Linux gives in KiB and macOS in bytes)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def train_group(specs: list[RunSpec], store: Store, options: TrainOptions = TrainOptions(),
                on_progress: GroupProgress | None = None,
                on_finished: RunFinished | None = None) -> dict[str, dict[str, Any] | Exception]:
    """Train the runs of one group (one ``group_key``) together and return each one's record,
    or the exception that failed it.

    Each run is built exactly as a solo run builds it (``seed_everything(seed)`` before its
    build, so no run's initialisation depends on another's) and keeps its own global-RNG state,
    swapped in for its steps. The loop goes epoch by epoch: the runs furthest behind whose
    next batches coincide (``TrainingRun.batch_position``) train the epoch together, one batch
    and one teacher forward (the union of their taps) at a time, then each run's step. So a
    group's runs are bit-identical on the CPU to the same runs trained alone; runs resumed at
    different epochs catch up apart and rejoin where their batches coincide; and a run whose
    pre-training stages consumed its stream runs its main stage apart (its batches are its
    own). A run that raises, or whose loss goes non-finite, ends failed and leaves the group;
    the others go on."""
    if not specs:
        return {}
    keys = {group_key(spec) for spec in specs}
    if len(keys) != 1:
        raise ValueError(f"the runs of a group must share setting, seed, precision, recipe and "
                         f"teacher; got {len(keys)} groups")
    report_to = on_progress or (lambda spec, event: None)
    finished_with = on_finished or (lambda spec, outcome: None)
    started = time.time()
    # ---- setup (shared) --------------------------------------------------------------------
    first = specs[0]
    setting = settings.for_spec(first)
    is_teacher = first.role == TEACHER
    base_recipe = setting.teacher_recipe if is_teacher else setting.recipe
    recipe = base_recipe.with_overrides(first.overrides)
    ranks = distributed.current()
    if first.processes != ranks.world_size:
        raise ValueError(f"{first.label()} trains across {first.processes} processes, but this "
                         f"process is one of {ranks.world_size} (kdbench/ranks.py starts them)")
    if ranks.distributed and len(specs) > 1:
        # The simplest correct rule: a run of several processes trains alone (its rank group is
        # its own); grouping would have to shard every member's batches alike.
        raise ValueError("a run across several processes trains alone, not in a group")
    # One process per GPU: a rank's device is its local GPU.
    device = distributed.device_of(pick_device(options), ranks)
    on_cuda = device.type == "cuda"
    precision = first.precision  # part of the run's identity (kdbench.spec)
    if options.threads:
        torch.set_num_threads(options.threads)
    configure_kernels(on_cuda, options.deterministic)
    # bf16 autocast covers the networks' forward passes only: the loss terms are computed
    # outside it from fp32 copies of the features (taps.as_float32).
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    seed_everything(first.seed)
    # Opened once (in-memory data moved to the device once): every run's stream reads it. The
    # stream also says the data's classes, channels and training-set size and labels.
    source = open_source(setting.dataset, setting.dataset_options, setting.train_subset,
                         options.data_dir)
    data_sha256 = fingerprint(source)  # before a validation split: the data as the setting names it
    held_out = None  # the validation split (kdbench/validation.py), when the runs hold one out
    held_out_set = None
    if first.held_out is not None:
        from kdbench import validation

        if not isinstance(source, Dataset):
            raise UserError(f"a validation split (--select-on val) is taken from in-memory data; "
                            f"{setting.dataset} is read from files (an ImageFolder)")
        source, held_out_set, held_out = validation.split(source, first.held_out)
        held_out_set = held_out_set.to(device)
    if isinstance(source, Dataset):
        source = source.to(device)
    outcomes: dict[str, dict[str, Any] | Exception] = {}
    shared: dict[str, Any] = {"teacher": None, "data_sha256": data_sha256}

    def fail(spec: RunSpec, error: Exception, run: TrainingRun | None = None) -> None:
        if run is not None:
            run.student_taps.remove()
            run.log.close()
        outcomes[spec.id] = error
        finished_with(spec, error)

    # ---- build (per run, as alone) ---------------------------------------------------------
    runs: list[TrainingRun] = []
    later: list[RunSpec] = []  # on CUDA, the runs that would not fit beside these
    for spec in specs:
        if later:
            later.append(spec)
            continue
        try:
            run = build_run(spec, setting, recipe, source, device, store, options, shared,
                            lambda event, spec=spec: report_to(spec, event), held_out_set)
        except Exception as error:  # a broken method or config fails its own run only
            fail(spec, error)
            continue
        if on_cuda and runs and not fits([r.parameter_bytes for r in runs + [run]],
                                         [r.activation_bytes for r in runs + [run]],
                                         torch.cuda.mem_get_info(device)[0]):
            # Split: this run and the rest train as a group of their own afterwards, built
            # again from their seeds (so exactly as they are built here).
            run.student_taps.remove()
            run.log.close()
            del run
            later.append(spec)
            continue
        runs.append(run)
    teacher: nn.Module | None = shared["teacher"]
    teacher_roles = frozenset().union(*(run.method.teacher_taps for run in runs
                                        if run.method.uses_teacher and not is_teacher))
    teacher_taps = FeatureTaps(teacher, teacher_roles) if teacher is not None else None
    teacher_forward = torch.compile(teacher) if options.compile and teacher is not None else teacher
    trained_together = [spec for spec in specs if spec not in later]
    provenance_group = {"size": len(trained_together), "members": [spec.id for spec in trained_together]}

    # ---- epochs ------------------------------------------------------------------------------
    active = [run for run in runs if not run.finished]
    for run in [run for run in runs if run.finished]:  # killed after its last checkpoint
        finish_run(run, setting, store, device, precision, options, is_teacher, started,
                   provenance_group, outcomes, finished_with, held_out)
    while active:
        leader = min(active, key=lambda run: run.epochs_done)
        position = leader.batch_position()
        cohort = [run for run in active if run.batch_position() == position]
        torch.set_num_threads(leader.threads)
        for run in list(cohort):
            try:
                with rng_of(run):
                    start_epoch(run, recipe, device)
            except Exception as error:
                cohort.remove(run)
                active.remove(run)
                fail(run.spec, error, run)
        if not cohort:
            continue
        steps = leader.stream.steps_per_epoch
        for step, (images, labels, index) in enumerate(leader.stream.epoch()):
            if ranks.distributed and not getattr(leader.stream, "sharded", False):
                # Every rank drew the same global batch (the same seeded stream); each trains
                # on its own 1/W of it. A last batch too small to give every rank two samples
                # is skipped by all of them alike. (A stream that shards itself, an
                # ImageFolder's, yields this rank's part already.)
                if not distributed.trains_on(len(labels), ranks):
                    continue
                images, labels, index = (distributed.shard(x, ranks) for x in (images, labels, index))
            if on_cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            batch = Batch(images, labels, index)
            for run, error in lockstep_step(cohort, batch, teacher_forward, teacher_taps, autocast,
                                            step, steps):
                cohort.remove(run)
                active.remove(run)
                fail(run.spec, error, run)
        for run in cohort:
            # Its stream drew this epoch through the leader's: the same state, so its
            # checkpoint resumes exactly where a run alone would.
            run.stream.load_state_dict(leader.stream.state_dict())
            try:
                with rng_of(run):
                    end_epoch(run, recipe, autocast, on_cuda)
            except Exception as error:
                active.remove(run)
                fail(run.spec, error, run)
                continue
            if run.finished:
                active.remove(run)
                finish_run(run, setting, store, device, precision, options, is_teacher,
                           started, provenance_group, outcomes, finished_with, held_out)
    if teacher_taps is not None:
        teacher_taps.remove()
    if later:
        del runs, active, teacher, teacher_forward, teacher_taps
        shared.clear()
        torch.cuda.empty_cache()
        outcomes.update(train_group(later, store, options, on_progress, on_finished))
    return {spec.id: outcomes[spec.id] for spec in specs}


def lockstep_step(cohort: list[TrainingRun], batch: Batch, teacher_forward: nn.Module | None,
                  teacher_taps: FeatureTaps | None, autocast: contextlib.AbstractContextManager,
                  step: int, steps: int) -> list[tuple[TrainingRun, Exception]]:
    """One batch for a cohort: one teacher forward with the union of its runs' taps, then each
    run's step with its own RNG state swapped in. Returns the runs that raised, with what."""
    t_all = None
    if teacher_forward is not None and any(run.method.uses_teacher for run in cohort):
        # Once per batch for the whole cohort. no_grad rather than inference_mode: methods
        # feed teacher features into trainable modules (an attention network over the
        # teacher's stages, say), which must save them for backward.
        with autocast, torch.no_grad():
            t_all = teacher_taps.pop(teacher_forward(batch.images))
    failed = []
    for run in cohort:
        t = restricted(t_all, run.method.teacher_taps) if run.method.uses_teacher else None
        try:
            with rng_of(run):
                train_step(run, batch, t, step, steps, autocast)
        except Exception as error:
            failed.append((run, error))
    return failed


def build_run(spec: RunSpec, setting: settings.Setting, recipe: settings.Recipe, source,
              device: torch.device, store: Store, options: TrainOptions, shared: dict[str, Any],
              report: Callable[[dict[str, Any]], None], held_out_set=None) -> TrainingRun:
    """Build one run as a run alone does, from its own seed: stream, method, student, teacher
    (the group's first one is kept in ``shared`` and serves every run: the others' are loaded
    too, as alone, for the RNG draws their construction makes, and dropped), dry pass, the
    method's modules, its checkpoint."""
    on_cuda = device.type == "cuda"
    is_teacher = spec.role == TEACHER
    seed_everything(spec.seed)
    # Evaluated as the test split is: its own stream, whose test batches are the split.
    val_stream = (BatchStream(held_out_set, device, recipe.batch_size, recipe.augmentation, spec.seed)
                  if held_out_set is not None else None)
    stream = stream_of(source, device, recipe.batch_size, recipe.augmentation, spec.seed,
                       options.loader_workers)
    if distributed.current().distributed and hasattr(stream, "take_shard"):
        stream.take_shard(distributed.current())  # it loads this rank's part of each batch only
    method_class = registry.get(spec.method)
    method: Method = method_class(method_class.Config.from_json(spec.config))
    arch = setting.teacher if is_teacher else setting.student
    student = build_model(arch, stream.num_classes, stream.in_channels).to(device)
    ranks = distributed.current()
    if spec.sync_bn:
        # Batch statistics over the global batch (torch's SyncBatchNorm, CUDA only); before
        # the taps, which hook the modules by name, and the checkpoint (same state_dict keys).
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    teacher: nn.Module | None = None
    teacher_weights_sha256: str | None = None
    if method.uses_teacher and not is_teacher:
        from kdbench.teachers import load_teacher, stored_teacher_weights  # teachers.py imports train.py

        loaded = load_teacher(spec.teacher_spec(), setting, stream, store)
        teacher_weights_sha256 = stored_teacher_weights(spec.teacher_spec(), store)
        if shared["teacher"] is None:
            loaded = loaded.to(device)
            loaded.eval().requires_grad_(False)
            if on_cuda:
                loaded = loaded.to(memory_format=torch.channels_last)
            shared["teacher"] = loaded
        teacher = shared["teacher"]
    if on_cuda:
        student = student.to(memory_format=torch.channels_last)
    student_taps = FeatureTaps(student, method.student_taps)
    sample = stream.sample(2)
    with torch.no_grad(), ActivationCounter(student) as activations:
        student.eval()
        student_shapes = shapes_of(student_taps.pop(student(sample)), student)
    with torch.no_grad():
        teacher_shapes = None
        if teacher is not None:
            # Its own taps for the dry pass: the shapes a run alone would see.
            dry_taps = FeatureTaps(teacher, method.teacher_taps)
            teacher_shapes = shapes_of(dry_taps.pop(teacher(sample)), teacher)
            dry_taps.remove()
    method.build(student_shapes, teacher_shapes, stream.num_train)
    method.to(device)
    method.observe_training_set(stream.train_labels.to(device))

    stages: list[PretrainStage] = [] if is_teacher else method.pretrain_stages()
    stage_epochs = [max(1, round(stage.epochs * setting.pretrain_scale)) for stage in stages]
    schedule = [(stage.name, epochs) for stage, epochs in zip(stages, stage_epochs)]
    schedule.append((MAIN_STAGE, recipe.epochs))

    # ---- resume ----------------------------------------------------------------------------
    checkpoint_path = store.checkpoint_path(spec.id)
    checkpoint = load_checkpoint(checkpoint_path, spec.id)
    # Its first epochs distilled another teacher (retrained since), or trained on another copy
    # of the data: going on would mix two experiments in one run.
    for key, now, what in (("teacher_weights_sha256", teacher_weights_sha256,
                            "distilled other teacher weights than the stored teacher's"),
                           ("data_sha256", shared.get("data_sha256"), "trained on other data")):
        if checkpoint is not None and checkpoint.get(key) not in (None, now):
            print(f"warning: ignoring checkpoint {checkpoint_path}: it {what}; starting over", flush=True)
            checkpoint = None
    history: list[dict[str, Any]] = []
    stage_index, epoch = 0, 0
    # The thread count of its checkpoint: on the CPU the numbers depend on it (the order of
    # floating-point sums), and a resumed run must end as the uninterrupted one would.
    threads = torch.get_num_threads()
    if checkpoint is not None:
        threads = checkpoint.get("threads") or threads
        student.load_state_dict(checkpoint["student"])
        method.load_state_dict(checkpoint["method"])
        history = checkpoint["history"]
        stage_index, epoch = checkpoint["stage_index"], checkpoint["epoch"]
        stream.load_state_dict(checkpoint["stream"])
    # Wrapped after the checkpoint is loaded: DDP broadcasts rank 0's weights as it is made,
    # and every rank has loaded the same checkpoint (rank 0's) by then.
    ddp = distributed.wrap(student, device, ranks) if ranks.distributed else None
    student_forward = ddp if ddp is not None else student
    student_forward = torch.compile(student_forward) if options.compile else student_forward
    kept = KeptStudents(store, spec.id, options.keep)
    kept.resume(checkpoint, history)
    log = EpochLog(store, spec.id, options.tensorboard)
    if ranks.is_writer:
        log.start(history)  # a resumed run's logs are rewritten from its checkpoint's history
    run = TrainingRun(
        spec=spec, method_class=method_class, method=method, student=student,
        student_forward=student_forward, student_taps=student_taps, stream=stream,
        stages=stages, stage_epochs=stage_epochs, schedule=schedule,
        checkpoint_path=checkpoint_path, checkpoint=checkpoint, history=history,
        stage_index=stage_index, epoch=epoch,
        rng=checkpoint["rng"] if checkpoint is not None else rng_state(), threads=threads,
        trained_seconds=checkpoint["trained_seconds"] if checkpoint else 0.0,
        images_seen=checkpoint["images_seen"] if checkpoint else 0,
        kept=kept, log=log, sample=sample, report=report,
        parameter_bytes=parameter_bytes([student, method]),
        activation_bytes=activations.scaled(len(sample), recipe.batch_size), val_stream=val_stream,
        ranks=ranks, ddp=ddp, teacher_weights_sha256=teacher_weights_sha256,
        data_sha256=shared.get("data_sha256"))
    skip_finished_stages(run)
    # What progress displays count (kdbench.progress): every stage's epochs, and how many of
    # them the checkpoint had done (a resumed run).
    report({"event": "start", "schedule": schedule, "epochs": sum(epochs for _, epochs in schedule),
            "done": len(history)})
    return run


def skip_finished_stages(run: TrainingRun) -> None:
    """A run killed between a stage's last checkpoint and the next stage's boundary checkpoint
    goes on at the next stage, as the boundary checkpoint would have said."""
    while run.stage_index + 1 < len(run.schedule) and run.epoch >= run.schedule[run.stage_index][1]:
        advance_stage(run)


def advance_stage(run: TrainingRun) -> None:
    # The next stage starts at its epoch 0 with its own optimiser: checkpoint that boundary so
    # a resumed run does not repeat this stage.
    run.stage_index, run.epoch = run.stage_index + 1, 0
    run.optimizer = run.scheduler = None
    checkpoint_run(run)
    run.checkpoint = None  # the next stage starts fresh in this process


def checkpoint_run(run: TrainingRun) -> None:
    """Everything a resumed run needs; optimiser None marks a stage boundary. Rank 0 writes it
    for a run of several processes: every rank resumes from it."""
    if not run.writes:
        return
    save_checkpoint(run.checkpoint_path, {
        "run_id": run.spec.id, "stage_index": run.stage_index, "epoch": run.epoch,
        "student": run.student.state_dict(), "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict() if run.optimizer else None,
        "scheduler": run.scheduler.state_dict() if run.scheduler else None,
        "stream": run.stream.state_dict(), "rng": run.rng, "history": run.history,
        "trained_seconds": run.trained_seconds, "images_seen": run.images_seen,
        **run.kept.checkpoint_state(),
        "threads": run.threads,
        "teacher_weights_sha256": run.teacher_weights_sha256,
        "data_sha256": run.data_sha256,
    })


def start_stage(run: TrainingRun, recipe: settings.Recipe) -> None:
    """The current stage's trainable set, optimiser and schedule (restored from the checkpoint
    when the run resumes inside this stage)."""
    pretrain = run.pretrain
    epochs = run.schedule[run.stage_index][1]
    if run.is_main:
        run.student_parameters = list(run.student.parameters())
        trainable = run.student_parameters + iter_parameters(run.method.trainable_modules())
        lr_schedule = "setting"
    else:
        run.student_parameters = (parameters_feeding(run.student, run.student_taps,
                                                     pretrain.student_up_to_stage, run.sample,
                                                     pretrain.student_role)
                                  if run.run_student else [])
        trainable = run.student_parameters + iter_parameters(pretrain.modules)
        lr_schedule = pretrain.lr_schedule
    stage_recipe = recipe if run.is_main else recipe.with_overrides(stage_overrides(pretrain))
    run.optimizer = build_optimizer(trainable, stage_recipe)
    run.scheduler = build_scheduler(run.optimizer, recipe, epochs, lr_schedule)
    checkpoint = run.checkpoint
    if checkpoint is not None and checkpoint["stage_index"] == run.stage_index:
        if checkpoint["optimizer"] is not None:  # None: saved at a stage boundary
            run.optimizer.load_state_dict(checkpoint["optimizer"])
            run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.checkpoint = None
    run.method_modules = run.method.trainable_modules() if run.is_main else pretrain.modules
    if run.ranks.distributed:
        # DDP averages the student's gradients inside the default backward (the loss sum's
        # one backward pass reaches every student parameter through its forward). Under a
        # method's own gradient rule (torch.autograd.grad, which DDP's hooks never see: a
        # method with its own rule, or a composition holding one) and in a pre-training stage
        # (part of the student unused), the step runs under DDP's no_sync and train_step
        # averages every trainable gradient itself, after the rule made them from this rank's
        # shard. The method's own modules are called inside its loss, not through a forward
        # DDP could wrap: their gradients are averaged by train_step always (the same
        # all-reduce DDP does, without its overlap).
        custom_rule = type(run.method).backward is not Method.backward
        run.ddp_syncs = run.is_main and not custom_rule
        run.averaged_parameters = (iter_parameters(run.method.trainable_modules()) if run.ddp_syncs
                                   else trainable)


def start_epoch(run: TrainingRun, recipe: settings.Recipe, device: torch.device) -> None:
    if run.optimizer is None:
        start_stage(run, recipe)
    run.epoch_started = time.time()
    run.student.train(run.run_student)
    run.method.eval()  # modules a stage trains are put in train mode just below
    for module in run.method_modules:
        module.train()
    run.loss_sum = torch.zeros((), device=device)
    run.term_sums = {}
    run.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    run.correct = torch.zeros((), dtype=torch.long, device=device)
    run.seen = 0


def train_step(run: TrainingRun, batch: Batch, t: Features | None, step: int, steps: int,
               autocast: contextlib.AbstractContextManager) -> None:
    """One optimiser step of ``run`` on ``batch``, given the teacher's features ``t``."""
    # Without DDP's own gradient averaging in this stage (start_stage), its forward and
    # backward go under no_sync, and the averaging happens below.
    with (run.ddp.no_sync() if run.ddp is not None and not run.ddp_syncs
          else contextlib.nullcontext()):
        _train_step(run, batch, t, step, steps, autocast)


def _train_step(run: TrainingRun, batch: Batch, t: Features | None, step: int, steps: int,
                autocast: contextlib.AbstractContextManager) -> None:
    images, labels = batch.images, batch.labels
    is_main = run.is_main
    epochs = run.schedule[run.stage_index][1]
    progress = Progress(run.epoch, epochs, step, steps, run.pretrain_total if is_main else 0)
    with autocast:
        if is_main:
            logits = run.student_forward(images)
            s = run.student_taps.pop(logits)
        else:
            s = run.student_taps.pop(run.student_forward(images)) if run.run_student else None
    # Losses, softmax with temperature, distances and attention maps in fp32.
    if is_main:
        terms = {"ce": run.method.ce_weight * F.cross_entropy(logits.float(), labels)}
        terms.update(run.method.loss(as_float32(s), as_float32(t), batch, progress))
    else:
        terms = run.pretrain.loss(as_float32(s), as_float32(t), batch)
    run.optimizer.zero_grad(set_to_none=True)
    if is_main:
        run.method.backward(terms, run.student_parameters, progress)
    else:
        torch.stack(list(terms.values())).sum().backward()
    if run.averaged_parameters is not None:
        distributed.average_gradients(run.averaged_parameters, run.ranks)
    run.optimizer.step()
    # Device-side bookkeeping only: no .item() in the hot loop.
    total = torch.stack([term.detach().float() for term in terms.values()]).sum()
    # ``step`` as a Python scalar: a kernel argument, not a host-to-device copy.
    run.first_bad_step = torch.where((run.first_bad_step < 0) & ~torch.isfinite(total),
                                     step, run.first_bad_step)
    run.loss_sum += total * len(labels)
    for name, term in terms.items():
        run.term_sums[name] = run.term_sums.get(name, 0.0) + term.detach().float() * len(labels)
    if is_main:
        run.correct += (logits.detach().argmax(1) == labels).sum()
    run.seen += len(labels)
    if step % 20 == 0:
        run.report({"event": "step", "stage": run.stage_name, "epoch": run.epoch + 1,
                    "epochs": epochs, "step": step + 1, "steps": steps})


def sum_over_ranks(run: TrainingRun) -> None:
    """The epoch's device-side sums over every rank's shard, in one all-reduce (float64, so
    the counts stay exact); the first non-finite step is the latest any rank saw (-1: none),
    so every rank fails the run alike."""
    names = sorted(run.term_sums)
    sums = torch.stack([run.loss_sum.double(), run.correct.double(),
                        torch.tensor(float(run.seen), dtype=torch.float64, device=run.loss_sum.device),
                        *(torch.as_tensor(run.term_sums[name]).double() for name in names)])
    distributed.sum_across(sums, run.ranks)
    run.loss_sum, run.correct, run.seen = sums[0], sums[1].long(), int(sums[2].item())
    run.term_sums = {name: sums[3 + index] for index, name in enumerate(names)}
    distributed.max_across(run.first_bad_step, run.ranks)
    # Every rank's student and method modules must be the same after every step (the same
    # averaged gradients, the same optimiser): a difference is a bug, such as a trainable
    # module whose gradients were not averaged, and would make rank 0's checkpoint not what
    # the others trained. One checksum per epoch says.
    checksum = torch.stack([parameter.detach().double().sum() for parameter in
                            [*run.student.parameters(), *run.method.parameters()]]).sum()
    bounds = distributed.max_across(torch.stack([checksum, -checksum]), run.ranks)
    if bounds[0].item() != -bounds[1].item():
        raise RuntimeError(f"the ranks' parameters differ after stage {run.stage_name!r} epoch "
                           f"{run.epoch + 1} (checksums from {-bounds[1].item()!r} to "
                           f"{bounds[0].item()!r}): a trainable module's gradients were not averaged")


def end_epoch(run: TrainingRun, recipe: settings.Recipe,
              autocast: contextlib.AbstractContextManager, on_cuda: bool) -> None:
    """The end of an epoch: the one host sync, the history entry, evaluation, checkpoint."""
    stage_name, epochs = run.schedule[run.stage_index]
    if run.ranks.distributed:
        sum_over_ranks(run)
    bad_step = int(run.first_bad_step.item())
    if bad_step >= 0:
        raise NonFiniteLoss(f"loss became non-finite in stage {stage_name!r}, epoch "
                            f"{run.epoch + 1}, step {bad_step + 1}")
    lr = run.optimizer.param_groups[0]["lr"]  # the one this epoch trained with
    run.scheduler.step()
    seen = run.seen
    entry: dict[str, Any] = {
        "stage": stage_name, "epoch": run.epoch + 1, "loss": run.loss_sum.item() / seen,
        "terms": {name: value.item() / seen for name, value in run.term_sums.items()},
        "lr": lr, "lr_next": run.optimizer.param_groups[0]["lr"],
    }
    if run.is_main:
        entry["train_top1"] = 100.0 * run.correct.item() / seen
        if (run.epoch + 1) % recipe.eval_every == 0 or run.epoch + 1 == epochs:
            # A run of several processes: rank 0 evaluates the plain student (a forward through
            # DDP is a collective), and tells every rank, so all hold the same history.
            scores: dict[str, float] = {}
            if run.writes:
                model = run.student if run.ranks.distributed else run.student_forward
                top1, top5 = evaluate(model, run.stream, autocast, on_cuda)
                scores.update(top1=top1, top5=top5)
                if run.val_stream is not None:
                    val_top1, val_top5 = evaluate(model, run.val_stream, autocast, on_cuda)
                    scores.update(val_top1=val_top1, val_top5=val_top5)
            entry.update(distributed.from_writer(scores, run.ranks))
    if run.ranks.distributed:
        entry["attempt"] = run.ranks.attempt  # the launcher's attempt: a resume shows in the history
    entry["seconds"] = time.time() - run.epoch_started
    run.trained_seconds += entry["seconds"]
    run.images_seen += seen
    run.history.append(entry)
    run.kept.observe(entry, run.student)  # a new best epoch's weights travel in the checkpoint
    run.epoch += 1
    checkpoint_run(run)
    if run.writes:
        run.log.epoch(run.history)
    run.report({"event": "epoch", **entry, "epochs": epochs})
    if run.epoch >= epochs and run.stage_index + 1 < len(run.schedule):
        advance_stage(run)


def finish_run(run: TrainingRun, setting: settings.Setting, store: Store,
               device: torch.device, precision: str, options: TrainOptions, is_teacher: bool,
               started: float, group: dict[str, Any],
               outcomes: dict[str, dict[str, Any] | Exception], finished_with: RunFinished,
               held_out=None) -> None:
    """Make a finished run's record (or its failure) and hand it on at once."""
    try:
        record = run_record(run, setting, store, device, precision, options, is_teacher,
                            started, group, held_out)
    except Exception as error:
        run.student_taps.remove()
        run.log.close()
        outcomes[run.spec.id] = error
        finished_with(run.spec, error)
        return
    outcomes[run.spec.id] = record
    finished_with(run.spec, record)


def run_record(run: TrainingRun, setting: settings.Setting, store: Store,
               device: torch.device, precision: str, options: TrainOptions, is_teacher: bool,
               started: float, group: dict[str, Any], held_out=None) -> dict[str, Any]:
    spec, method, history = run.spec, run.method, run.history
    run.student_taps.remove()
    run.log.close()
    main = [entry for entry in history if entry["stage"] == MAIN_STAGE and "top1" in entry]
    best = max(main, key=lambda entry: entry["top1"])
    record: dict[str, Any] = {
        "id": spec.id,
        "status": "done",
        "spec": spec.to_json(),
        "setting": {**setting.to_json(), "recipe": {**setting.to_json()["teacher_recipe" if is_teacher else "recipe"], **spec.overrides},
                    "num_classes": run.stream.num_classes, "in_channels": run.stream.in_channels,
                    "pretrain_epochs": run.stage_epochs},
        "config": method.config.to_json(),
        "metrics": {"top1_last": main[-1]["top1"], "top5_last": main[-1]["top5"],
                    "top1_best": best["top1"], "top5_best": best["top5"], "best_epoch": best["epoch"],
                    **(validation_metrics(main) if held_out is not None else {})},
        "history": history,
        **({"validation": held_out.to_json()} if held_out is not None else {}),
        "error": None,
        "wall_seconds": time.time() - started,
        "train_seconds": run.trained_seconds,
        "images_per_second": run.images_seen / run.trained_seconds if run.trained_seconds else None,
        "extra_parameters": method.extra_parameters(),
        # The group's process: every run of a group reports the same peak.
        "peak_memory_bytes": peak_memory_bytes(device),
        # The teacher's run uses the student-alone method, but its row is the teacher's.
        "method_display_name": "Teacher" if is_teacher else method.configured_display_name(),
        "provenance": {**provenance(run.method_class, device, precision, options.deterministic),
                       "threads": run.threads, "group": group},
    }
    if is_teacher:
        from kdbench.teachers import save_teacher_weights

        record["teacher_weights"] = save_teacher_weights(run.student, spec, store)
    if run.writes:
        record["student_weights"] = run.kept.keep(run.student, main[-1]["epoch"], best["epoch"],
                                                  last=record.get("teacher_weights"))
    if run.teacher_weights_sha256 is not None:
        record["provenance"]["teacher_weights_sha256"] = run.teacher_weights_sha256
    if run.data_sha256 is not None:
        record["provenance"]["data_sha256"] = run.data_sha256
    if run.ranks.distributed:
        record["provenance"]["distributed"] = distributed.provenance(run.ranks, spec.sync_bn)
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
