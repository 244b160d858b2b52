"""Teachers: trained once per setting and teacher seed, cached with a checksum, reused by every
method and seed; or a user's own state_dict (``--teacher-checkpoint``).

Two launches on one results directory (or many SLURM array tasks) never train the same
teacher at once: the first takes the run's claim (kdbench.claims) and trains, the others wait
on it and then find the finished teacher. A teacher whose weights file went missing or changed
is not ready (``kdbench.grid.teacher_weights_problem``): it is trained again, or a user's
checkpoint registered and evaluated again.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdbench.errors import UserError
from kdbench.models import build_model
from kdbench.settings import Setting
from kdbench.spec import RunSpec
from kdbench.store import Store, sha256_file, write_atomically


def save_teacher_weights(model: nn.Module, spec: RunSpec, store: Store) -> dict[str, str]:
    buffer = io.BytesIO()
    torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()}, buffer)
    path = store.teacher_path(spec.id)
    write_atomically(path, buffer.getvalue())
    return {"path": str(path.relative_to(store.root)), "sha256": sha256_file(path)}


def teacher_ready(spec: RunSpec, store: Store) -> bool:
    """A finished teacher record whose weights exist and match their checksum."""
    from kdbench.grid import teacher_weights_problem

    try:
        record = store.read(spec.id)
    except Exception:
        return False
    return (record is not None and record.get("status") == "done"
            and teacher_weights_problem(record, store) is None)


def load_state_dict_for(path: Path, arch: str, dataset) -> dict[str, Any]:
    """Load a teacher state_dict and check it fits ``arch`` on ``dataset`` (anything that says
    its ``num_classes`` and ``in_channels``: a Dataset, a stream, a DataShape); UserError if not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"teacher checkpoint {path} does not load: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a common wrapper ({"state_dict": ..., "epoch": ...})
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # RepDistiller's teacher files
    model = build_model(arch, dataset.num_classes, dataset.in_channels)
    try:
        model.load_state_dict(state)
    except Exception as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:300]
        raise UserError(f"teacher checkpoint {path} does not fit {arch} with "
                        f"{dataset.num_classes} classes and {dataset.in_channels} input channels: "
                        f"{detail}") from None
    return state


def load_teacher(teacher_spec: RunSpec, setting: Setting, dataset, store: Store) -> nn.Module:
    """The trained teacher of ``teacher_spec`` (it must have been trained or registered);
    ``dataset`` says the classes and input channels (a Dataset, a stream, a DataShape)."""
    if not teacher_ready(teacher_spec, store):
        raise RuntimeError(f"teacher {teacher_spec.label()} ({teacher_spec.id}) is not trained yet: "
                           "the launcher trains teachers before students")
    record = store.read(teacher_spec.id)
    path = store.root / record["teacher_weights"]["path"]
    model = build_model(setting.teacher, dataset.num_classes, dataset.in_channels)
    model.load_state_dict(load_state_dict_for(path, setting.teacher, dataset))
    return model


def stored_teacher_weights(teacher_spec: RunSpec, store: Store) -> str:
    """The sha256 of the trained teacher's weights file (its record's; ``load_teacher`` has
    checked the file against it): what a student's provenance names as its teacher."""
    return store.read(teacher_spec.id)["teacher_weights"]["sha256"]


TORCHVISION_WEIGHTS = "torchvision:"


def resolve_checkpoint(given: str | Path, setting: Setting) -> Path:
    """The file ``--teacher-checkpoint`` names: a path, or ``torchvision:<model>`` (also
    ``torchvision:<model>.<WEIGHTS>``, e.g. ``torchvision:resnet50.IMAGENET1K_V2``) for
    torchvision's pretrained weights of the setting's ``torchvision.<model>`` teacher, where
    they are in the user's torch hub cache (``torch.hub.get_dir()``/checkpoints, where
    torchvision's ``weights=`` downloads them). Nothing is downloaded: a missing file is one
    line saying where it was looked for.

    ``<model>`` alone means IMAGENET1K_V1, torchvision's original ImageNet weights: the
    teachers of the KD papers' ImageNet tables (mdistiller's ``model_urls`` name those files),
    not torchvision's later DEFAULT (V2 for resnet50, trained with another recipe)."""
    text = str(given)
    if not text.startswith(TORCHVISION_WEIGHTS):
        return Path(given)
    import torchvision

    model, _, weights_name = text[len(TORCHVISION_WEIGHTS):].partition(".")
    if setting.teacher != f"torchvision.{model}":
        raise UserError(f"--teacher-checkpoint {text}: the teacher of {setting.name} is "
                        f"{setting.teacher}, not torchvision.{model}")
    try:
        weights = torchvision.models.get_model_weights(model)[weights_name or "IMAGENET1K_V1"]
    except (KeyError, ValueError):
        known = ", ".join(torchvision.models.get_model_weights(model).__members__)
        raise UserError(f"--teacher-checkpoint {text}: torchvision has no weights "
                        f"{weights_name!r} for {model} (it has {known})") from None
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise UserError(f"--teacher-checkpoint {text}: torchvision's {weights} weights are not in "
                        f"the torch hub cache ({path}); kdbench does not download them: fetch "
                        f"{weights.url} there (or load torchvision.models.{model}(weights=...) once)")
    return path


def register_checkpoint(path: Path, setting: Setting, store: Store, teacher_seed: int = 0,
                        data_dir: Path | None = None) -> str:
    """Check a user's teacher state_dict against the setting and put it where students find
    it. Returns its sha256 (part of every dependent RunSpec, so results never mix teachers)."""
    from kdbench.data import shape_of
    from kdbench.spec import TEACHER, TEACHER_METHOD

    path = Path(path)
    if path.is_dir():
        raise UserError(f"teacher checkpoint {path} is a directory, not a state_dict file")
    if not path.is_file():
        raise UserError(f"teacher checkpoint {path} does not exist")
    checksum = sha256_file(path)
    shape = shape_of(setting.dataset, setting.dataset_options, data_dir)
    state = load_state_dict_for(path, setting.teacher, shape)
    spec = RunSpec(setting.name, TEACHER_METHOD, teacher_seed, TEACHER, teacher_checkpoint=checksum,
                   **setting.spec_fields())
    target = store.teacher_path(spec.id)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # Written again when it went missing or was damaged since (the teacher record's checksum
    # then no longer matches, and the record is made again from this file).
    if not target.is_file() or target.read_bytes() != buffer.getvalue():
        write_atomically(target, buffer.getvalue())
    return checksum


def record_for_checkpoint(spec: RunSpec, store: Store, options: "TrainOptions") -> dict[str, Any]:
    """The teacher record of a registered user checkpoint: its test accuracy, no training."""
    import contextlib
    import time

    from kdbench import registry, settings
    from kdbench.data import Augmentation, open_stream
    from kdbench.train import evaluate, pick_device, provenance

    started = time.time()
    setting = settings.for_spec(spec)
    device = pick_device(options)
    stream = open_stream(setting.dataset, setting.dataset_options, setting.train_subset, device,
                         256, Augmentation(), 0, options.data_dir, options.loader_workers)
    dataset = stream
    path = store.teacher_path(spec.id)
    model = build_model(setting.teacher, dataset.num_classes, dataset.in_channels)
    model.load_state_dict(load_state_dict_for(path, setting.teacher, dataset))
    top1, top5 = evaluate(model.to(device), stream, contextlib.nullcontext(), channels_last=False)
    return {
        "id": spec.id, "status": "done", "spec": spec.to_json(),
        "setting": {**setting.to_json(), "recipe": setting.to_json()["teacher_recipe"],
                    "num_classes": dataset.num_classes, "in_channels": dataset.in_channels},
        "config": {}, "error": None, "history": [],
        "metrics": {"top1_last": top1, "top5_last": top5, "top1_best": top1, "top5_best": top5,
                    "best_epoch": None},
        "wall_seconds": time.time() - started, "images_per_second": None, "extra_parameters": 0,
        "method_display_name": "Teacher",
        "teacher_weights": {"path": str(path.relative_to(store.root)), "sha256": sha256_file(path)},
        "provenance": {**provenance(registry.get(spec.method), device, "fp32"),
                       "teacher_checkpoint_sha256": spec.teacher_checkpoint},
    }
