"""The method contract, for built-in and third-party methods alike.

A plugin author checks a method with one command (it exits non-zero with the first broken
promise, named)::

    python -m kdbench.testing mykd          # or: pytest --pyargs kdbench.testing
    python -m kdbench.testing --model mynet # an architecture (a kdbench.models plugin)

``check_method(name)`` raises ``AssertionError`` with a message that names the method, the
teacher/student pair and the step when the method breaks a promise the engine relies on:

1. it loads from its entry point, declares ``name``/``paper``/taps, its row title
   (``display_name``) and where its definition comes from (``fidelity``, one of
   ``kdbench.method.FIDELITIES``, with a one-line ``fidelity_note``), and its ``Config`` is a
   frozen ``MethodConfig`` that round-trips through JSON (run specs and records store it as JSON);
2. on every architecture family as student (``FAMILY_EXAMPLES``), with a teacher of the same
   architecture and one of another family (different widths, 3 vs 4 stages), on tiny real
   networks (16-px images, batch 4):
   - ``build`` sizes its modules from the dry-forward shapes, and its ``state_dict`` loads into a
     freshly built twin (checkpoint resume);
   - each pre-training stage runs one step: its terms are finite scalars, its gradients reach
     every module it trains (and the student up to its stage, when it has one), its trainable
     parameters change, and no other parameter does (student, method or teacher);
   - one main-stage step runs through ``loss`` and ``backward``: finite scalar terms, the
     method's own terms reach the student, every extra trainable module gets a gradient and
     changes, the teacher and untrained modules stay as they were;
   - neither step makes the host wait for the GPU (``kdbench.host_sync``: ``.item()``, boolean
     masks, data-dependent shapes, solver error checks), except through the operations the
     method declares in ``host_syncs``, and every declared one is used;
3. on the feature shapes of every registered setting's teacher/student pair at its real image
   size (kdbench/settings.py), ``build``, every stage loss and ``loss`` run and back-propagate.

Everything comes from the engine's own pieces (``build_model``, ``FeatureTaps``,
``train.shapes_of``, ``train.parameters_feeding``), so the checks take the code paths
``train`` takes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from functools import lru_cache
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench import registry, settings
from kdbench.data import shape_of
from kdbench.errors import UserError
from kdbench.host_sync import HostSync, host_syncs, ops_of, reported_names
from kdbench.method import (
    EMBEDDING,
    POSTACT_STAGES,
    PREACT_STAGES,
    ROLES,
    STAGES,
    Batch,
    FeatureShapes,
    Features,
    Method,
    MethodConfig,
    PretrainStage,
    Progress,
    iter_parameters,
    metadata_problems,
)
from kdbench.models import FAMILY_EXAMPLES, build_model
from kdbench.taps import FeatureTaps
from kdbench.train import parameters_feeding, shapes_of

IMAGE_SIZE = 16  # the smallest input every family accepts (VGG pools down to 2×2)
BATCH_SIZE = 4
NUM_CLASSES = 5
NUM_TRAIN = 32  # what ``build`` is told the training set holds (memory-bank methods size by it)
LR = 0.05  # plain SGD, no weight decay: in a contract step only gradients may move a parameter


class ContractError(AssertionError):
    pass


def contract_pairs() -> list[tuple[str, str]]:
    """(teacher, student) architectures: each family's example as student, taught by its own
    architecture and by the next family's example (wrn ← resnet ← resnet_x4 ← vgg ← wrn), so
    every family is a teacher and a student, widths differ, and 3-stage and 4-stage networks
    meet in both directions."""
    families = list(FAMILY_EXAMPLES)
    pairs = []
    for position, family in enumerate(families):
        student = FAMILY_EXAMPLES[family]
        other = FAMILY_EXAMPLES[families[(position + 1) % len(families)]]
        pairs += [(student, student), (other, student)]
    return pairs


def check_method(name: str) -> None:
    """Check the registered method ``name`` against the contract above; AssertionError if not."""
    check_method_class(load(name), name)


def check_method_class(method_class: type[Method], name: str | None = None) -> None:
    """The same checks on a class that need not be registered (used to test the checks)."""
    name = name or getattr(method_class, "name", method_class.__name__)
    check_declaration(name, method_class)
    threads = torch.get_num_threads()
    # Tiny tensors: one thread avoids the synchronisation cost (and, on a shared machine,
    # oversubscription) that makes these checks several times slower with more.
    torch.set_num_threads(1)
    try:
        check_steps(method_class, name)
    finally:
        torch.set_num_threads(threads)


def check_steps(method_class: type[Method], name: str) -> None:
    pairs: list[tuple[str | None, str]] = list(contract_pairs())
    if not method_class.uses_teacher:
        pairs = [(None, student) for student in dict.fromkeys(student for _, student in pairs)]
    synced: set[str] = set()
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        for teacher_arch, student_arch in pairs:
            where = (f"{teacher_arch} teacher → {student_arch} student" if teacher_arch
                     else f"{student_arch} student")
            with context(name, where):
                synced |= check_pair(method_class, teacher_arch, student_arch)
        unused = sorted(set(method_class.host_syncs) - synced)
        if unused:
            raise ContractError(f"method {name!r}: declares host_syncs {unused} that none of its "
                                "steps issues: remove them")
        for setting in settings.SETTINGS.values():
            with context(name, f"setting {setting.name} (feature shapes only)"):
                check_setting_shapes(method_class, setting)


# --- step 1: loading and declaration ----------------------------------------------------------

def load(name: str) -> type[Method]:
    try:
        return registry.get(name)
    except UserError as error:  # unknown name or a plugin whose import fails
        raise ContractError(f"method {name!r} does not load: {error}") from error


def check_declaration(name: str, method_class: type[Method]) -> None:
    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ContractError(f"method {name!r}: {message}")

    require(isinstance(getattr(method_class, "paper", None), str) and method_class.paper.strip() != "",
            "declares no `paper` (the citation `kdbench list` shows)")
    problems = metadata_problems(method_class)
    require(not problems, "; ".join(problems))
    for side in ("student_taps", "teacher_taps"):
        roles = getattr(method_class, side)
        require(isinstance(roles, (set, frozenset)) and set(roles) <= ROLES,
                f"{side} = {roles!r}: must be a frozenset of roles from {sorted(ROLES)}")
    require(method_class.uses_teacher or not method_class.teacher_taps,
            "declares teacher_taps but uses_teacher is False")
    declared = getattr(method_class, "host_syncs", {})
    require(isinstance(declared, Mapping) and all(
        isinstance(op, str) and isinstance(why, str) and why.strip() for op, why in declared.items()),
        f"host_syncs = {declared!r}: must map operation names to the reason each is needed")
    unknown = sorted(set(declared) - reported_names())
    require(not unknown, f"host_syncs names {unknown}, which kdbench.host_sync never reports "
            f"(it reports {sorted(reported_names())})")
    config_class = method_class.Config
    require(isinstance(config_class, type) and issubclass(config_class, MethodConfig),
            f"Config {config_class!r} is not a subclass of kdbench.method.MethodConfig")
    require(dataclasses.is_dataclass(config_class) and config_class.__dataclass_params__.frozen,
            f"Config {config_class.__name__} must be a @dataclass(frozen=True)")
    try:
        config = config_class()
    except Exception as error:
        raise ContractError(f"method {name!r}: Config() with its defaults fails: "
                            f"{type(error).__name__}: {error}") from error
    try:
        text = json.dumps(config.to_json())
    except (TypeError, ValueError) as error:
        raise ContractError(f"method {name!r}: config {config} is not JSON-serialisable: {error}") from error
    try:
        back = config_class.from_json(json.loads(text))
    except Exception as error:
        raise ContractError(f"method {name!r}: Config.from_json(config.to_json()) fails on {text}: "
                            f"{type(error).__name__}: {error}") from error
    require(back == config, f"config does not round-trip through JSON: {config} → {text} → {back}")
    try:
        shown = method_class(config).configured_display_name()
    except Exception as error:
        raise ContractError(f"method {name!r}: configured_display_name() with the default config "
                            f"fails: {type(error).__name__}: {error}") from error
    require(isinstance(shown, str) and shown.strip() != "" and "\n" not in shown,
            f"configured_display_name() = {shown!r}: must be a non-empty single line")


# --- step 2: one step on real networks -----------------------------------------------------------

@contextlib.contextmanager
def context(name: str, where: str) -> Iterator[None]:
    """Prefix every failure with the method and the pair; turn a method's exception into a
    contract failure (chained, so the traceback still points into the method)."""
    try:
        yield
    except ContractError as error:
        raise ContractError(f"method {name!r}, {where}: {error}") from error.__cause__
    except Exception as error:
        raise ContractError(f"method {name!r}, {where}: raised {type(error).__name__}: {error}") from error


def check_pair(method_class: type[Method], teacher_arch: str | None, student_arch: str) -> set[str]:
    """Each pre-training stage's step and the main step on one pair; the host-synchronising
    operations they issued (all declared ones: an undeclared one fails)."""
    torch.manual_seed(0)
    student = build_model(student_arch, NUM_CLASSES, 3)
    teacher = build_model(teacher_arch, NUM_CLASSES, 3) if teacher_arch is not None else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    student_taps = FeatureTaps(student, method_class.student_taps)
    teacher_taps = FeatureTaps(teacher, method_class.teacher_taps) if teacher is not None else None
    images = torch.randn(BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = Batch(images, torch.arange(BATCH_SIZE) % NUM_CLASSES, torch.arange(BATCH_SIZE))
    try:
        with torch.no_grad():
            student.eval()
            student_shapes = shapes_of(student_taps.pop(student(images[:2])), student)
            teacher_shapes = (shapes_of(teacher_taps.pop(teacher(images[:2])), teacher)
                              if teacher is not None else None)
        method = built(method_class, student_shapes, teacher_shapes)

        def teacher_features() -> Features | None:
            if teacher is None:
                return None
            with torch.no_grad():  # as the engine: teacher features carry no graph
                return teacher_taps.pop(teacher(images))

        stages = method.pretrain_stages()
        synced: set[str] = set()
        for stage in stages:
            with stage_context(stage):
                synced |= check_stage(method, stage, student, student_taps, teacher, teacher_features, batch)
        progress = Progress(epoch=0, epochs=2, step=0, steps_per_epoch=1,
                            pretrain_epochs=sum(stage.epochs for stage in stages))
        with stage_context(None):
            synced |= check_main_step(method, student, student_taps, teacher, teacher_features,
                                      batch, progress)
        return synced
    finally:
        student_taps.remove()
        if teacher_taps is not None:
            teacher_taps.remove()


def training_labels(num_classes: int) -> Tensor:
    """The labels of the contract's NUM_TRAIN-sample training set: sample i has class
    i mod num_classes, as the contract's batches (index i, label i mod num_classes) say."""
    return torch.arange(NUM_TRAIN) % num_classes


def built(method_class: type[Method], student_shapes: FeatureShapes,
          teacher_shapes: FeatureShapes | None) -> Method:
    method = method_class(method_class.Config())
    method.build(student_shapes, teacher_shapes, NUM_TRAIN)
    method.observe_training_set(training_labels(NUM_CLASSES))
    if not isinstance(method.extra_parameters(), int):
        raise ContractError("extra_parameters() must return an int")
    twin = method_class(method_class.Config())
    twin.build(student_shapes, teacher_shapes, NUM_TRAIN)
    try:
        twin.load_state_dict(method.state_dict())
    except Exception as error:
        raise ContractError("state_dict() of a built method does not load into a freshly built "
                            f"one (a resumed run would fail): {error}") from error
    return method


@contextlib.contextmanager
def stage_context(stage: PretrainStage | None) -> Iterator[None]:
    label = "main stage" if stage is None else f"pre-training stage {stage.name!r}"
    try:
        yield
    except ContractError as error:
        raise ContractError(f"{label}: {error}") from error.__cause__
    except Exception as error:
        raise ContractError(f"{label}: raised {type(error).__name__}: {error}") from error


def check_terms(terms: object, what: str) -> dict[str, Tensor]:
    if not isinstance(terms, dict) or (not terms and what != "loss()"):
        raise ContractError(f"{what} must return a non-empty dict of named loss terms, got {terms!r}")
    for key, term in terms.items():
        if not isinstance(key, str):
            raise ContractError(f"{what}: term names must be str, got {key!r}")
        if not isinstance(term, Tensor) or term.dim() != 0:
            shape = tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__
            raise ContractError(f"{what}: term {key!r} must be a scalar tensor, got {shape}")
        if not torch.isfinite(term.detach()).item():
            raise ContractError(f"{what}: term {key!r} is not finite ({term.item()})")
        if not term.is_floating_point():
            raise ContractError(f"{what}: term {key!r} must be a floating-point tensor")
    return terms


def snapshot(named: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {key: parameter.detach().clone() for key, parameter in named.items()}


def all_parameters(student: nn.Module, method: Method, teacher: nn.Module | None) -> dict[str, nn.Parameter]:
    named = {f"student.{key}": p for key, p in student.named_parameters()}
    named.update({f"method.{key}": p for key, p in method.named_parameters()})
    if teacher is not None:
        named.update({f"teacher.{key}": p for key, p in teacher.named_parameters()})
    return named


def module_names(method: Method, modules: list[nn.Module]) -> dict[int, str]:
    names = {id(module): f"method.{key}" if key else "method" for key, module in method.named_modules()}
    return {id(module): names.get(id(module), type(module).__name__) for module in modules}


def require_gradients(modules: list[nn.Module], names: dict[int, str], what: str) -> None:
    for module in modules:
        parameters = list(module.parameters())
        if not parameters:
            continue
        missing = [key for key, p in module.named_parameters() if p.grad is None]
        if missing:
            raise ContractError(f"no gradient reaches {names[id(module)]} ({what}): "
                                f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
        if not all(torch.isfinite(p.grad).all() for p in parameters):
            raise ContractError(f"non-finite gradient in {names[id(module)]} ({what})")
        if all(p.grad.abs().sum() == 0 for p in parameters):
            raise ContractError(f"gradients of {names[id(module)]} are all zero ({what})")


def require_unchanged(before: dict[str, Tensor], named: dict[str, nn.Parameter], trainable: set[int],
                      what: str) -> None:
    moved = [key for key, p in named.items()
             if id(p) not in trainable and not torch.equal(before[key], p.detach())]
    if moved:
        raise ContractError(f"parameters outside {what} changed: {', '.join(moved[:4])}"
                            f"{' …' if len(moved) > 4 else ''}")


def require_changed(before: dict[str, Tensor], named: dict[str, nn.Parameter], ids: set[int],
                    what: str) -> None:
    if ids and not any(id(p) in ids and not torch.equal(before[key], p.detach()) for key, p in named.items()):
        raise ContractError(f"one optimiser step left {what} unchanged")


def check_stage(method: Method, stage: PretrainStage, student: nn.Module, student_taps: FeatureTaps,
                teacher: nn.Module | None, teacher_features, batch: Batch) -> set[str]:
    if not isinstance(stage, PretrainStage):
        raise ContractError(f"pretrain_stages() must return PretrainStage objects, got {stage!r}")
    if not isinstance(stage.epochs, int) or stage.epochs < 1:
        raise ContractError(f"epochs must be a positive int, got {stage.epochs!r}")
    if stage.lr_schedule not in ("constant", "setting"):
        raise ContractError(f"lr_schedule must be 'constant' or 'setting', got {stage.lr_schedule!r}")
    weight_decay = getattr(stage, "weight_decay", None)
    if weight_decay is not None and not weight_decay >= 0:
        raise ContractError(f"weight_decay must be None or >= 0, got {weight_decay!r}")
    lr = getattr(stage, "lr", None)
    if lr is not None and not lr > 0:
        raise ContractError(f"lr must be None or > 0, got {lr!r}")
    role = getattr(stage, "student_role", STAGES)
    if stage.student_up_to_stage is not None and role not in type(method).student_taps:
        raise ContractError(f"student_up_to_stage needs the {role!r} role (student_role) in student_taps")
    method_modules = set(map(id, method.modules()))
    strangers = [module for module in stage.modules if id(module) not in method_modules]
    if strangers:
        raise ContractError("trains modules that are not submodules of the method (they would not be "
                            f"checkpointed or moved to the device): {[type(m).__name__ for m in strangers]}")
    run_student = stage.student_up_to_stage is not None
    feeding = (parameters_feeding(student, student_taps, stage.student_up_to_stage, batch.images[:2], role)
               if run_student else [])
    stage_parameters = iter_parameters(stage.modules)
    trainable = feeding + stage_parameters
    if not trainable:
        raise ContractError("trains nothing (no student_up_to_stage and no parameters in modules)")
    named = all_parameters(student, method, teacher)
    before = snapshot(named)
    optimizer = torch.optim.SGD(trainable, lr=LR, momentum=0.9)
    student.train(run_student)
    method.eval()
    for module in stage.modules:
        module.train()
    t = teacher_features()
    s = student_taps.pop(student(batch.images)) if run_student else None
    with host_syncs() as loss_syncs:
        terms = stage.loss(s, t, batch)
    terms = check_terms(terms, "the stage's loss")
    optimizer.zero_grad(set_to_none=True)
    for parameter in named.values():
        parameter.grad = None
    with host_syncs() as backward_syncs:
        torch.stack(list(terms.values())).sum().backward()
    synced = require_declared_syncs(method, loss_syncs + backward_syncs, "the stage's loss")
    names = module_names(method, stage.modules)
    require_gradients(stage.modules, names, "its stage loss")
    trainable_ids = set(map(id, trainable))
    if run_student:
        if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in feeding):
            raise ContractError(f"the stage loss does not reach the student up to stage "
                                f"{stage.student_up_to_stage}")
    leaking = [key for key, p in named.items()
               if id(p) not in trainable_ids and p.grad is not None and p.grad.abs().sum() > 0]
    if leaking:
        raise ContractError("the stage loss has gradients for parameters the stage does not train "
                            f"(declare them in modules / student_up_to_stage, or detach): "
                            f"{', '.join(leaking[:4])}{' …' if len(leaking) > 4 else ''}")
    optimizer.step()
    require_changed(before, named, set(map(id, feeding)), "the student's trainable parameters")
    for module in stage.modules:
        require_changed(before, named, set(map(id, module.parameters())), names[id(module)])
    require_unchanged(before, named, trainable_ids, "the stage's trainable set")
    return synced


def require_declared_syncs(method: Method, found: list[HostSync], what: str) -> set[str]:
    """The operations in ``found``, if the method declares each of them in ``host_syncs``."""
    undeclared = [str(sync) for sync in found if sync.op not in type(method).host_syncs]
    if undeclared:
        raise ContractError(
            f"{what} makes the host wait for the GPU at every step: {'; '.join(dict.fromkeys(undeclared))}. "
            "Keep the values on the device (e.g. sum/count instead of a boolean mask's mean), or "
            "declare the operation in the method's host_syncs with why it cannot be avoided")
    return ops_of(found)


def check_main_step(method: Method, student: nn.Module, student_taps: FeatureTaps,
                    teacher: nn.Module | None, teacher_features, batch: Batch, progress: Progress) -> set[str]:
    extra_modules = method.trainable_modules()
    method_modules = set(map(id, method.modules()))
    strangers = [module for module in extra_modules if id(module) not in method_modules]
    if strangers:
        raise ContractError("trainable_modules() returns modules that are not submodules of the method: "
                            f"{[type(m).__name__ for m in strangers]}")
    student_parameters = list(student.parameters())
    extra_parameters = iter_parameters(extra_modules)
    trainable = student_parameters + extra_parameters
    named = all_parameters(student, method, teacher)
    before = snapshot(named)
    optimizer = torch.optim.SGD(trainable, lr=LR, momentum=0.9)
    student.train()
    method.eval()
    for module in extra_modules:
        module.train()
    t = teacher_features()
    logits = student(batch.images)
    s = student_taps.pop(logits)
    terms = {"ce": method.ce_weight * F.cross_entropy(logits.float(), batch.labels)}
    with host_syncs() as loss_syncs:
        own = method.loss(s, t, batch, progress)
    if isinstance(own, dict) and "ce" in own:
        raise ContractError("loss() returned a 'ce' term: that name is the engine's (set ce_weight instead)")
    check_terms(own, "loss()")
    terms.update(own)
    transfer = [term for term in own.values() if term.requires_grad]
    if own and not transfer:
        raise ContractError(f"loss() terms {sorted(own)} carry no gradient")
    if transfer:
        grads = torch.autograd.grad(torch.stack(transfer).sum(), student_parameters, retain_graph=True,
                                    allow_unused=True)
        if not any(g is not None and g.abs().sum() > 0 for g in grads):
            raise ContractError(f"the method's own terms {sorted(own)} do not reach the student's parameters")
    optimizer.zero_grad(set_to_none=True)
    for parameter in named.values():
        parameter.grad = None
    with host_syncs() as backward_syncs:
        method.backward(terms, student_parameters, progress)
    synced = require_declared_syncs(method, loss_syncs + backward_syncs, "loss() and backward()")
    bad = [key for key, p in student.named_parameters()
           if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise ContractError(f"non-finite student gradients after backward(): {', '.join(bad[:4])}")
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_parameters):
        raise ContractError("backward() left the student without gradients")
    names = module_names(method, extra_modules)
    require_gradients(extra_modules, names, "trainable_modules() in the main stage")
    if teacher is not None and any(p.grad is not None for p in teacher.parameters()):
        raise ContractError("gradients reached the teacher")
    trainable_ids = set(map(id, trainable))
    leaking = [key for key, p in method.named_parameters()
               if id(p) not in trainable_ids and p.grad is not None and p.grad.abs().sum() > 0]
    if leaking:
        raise ContractError("the main-stage loss has gradients for method parameters that "
                            f"trainable_modules() leaves out: {', '.join(leaking[:4])}")
    optimizer.step()
    require_changed(before, named, set(map(id, student_parameters)), "the student")
    for module in extra_modules:
        require_changed(before, named, set(map(id, module.parameters())), names[id(module)])
    require_unchanged(before, named, trainable_ids,
                      "the student and trainable_modules() (the teacher, modules of finished stages)")
    return synced


# --- step 3: every setting's pair, on feature shapes ---------------------------------------------

@lru_cache(maxsize=None)
@lru_cache(maxsize=None)
def architecture_shapes(arch: str, num_classes: int, in_channels: int, size: int) -> FeatureShapes:
    """Feature shapes of ``arch`` at the setting's real image size, from a dry forward pass.
    Cached: shapes do not depend on the weights, and every method's contract asks for the same
    pairs (the ImageNet settings' ResNet50 at 224 px once, not once per method)."""
    model = build_model(arch, num_classes, in_channels).eval()
    taps = FeatureTaps(model, ROLES)
    try:
        with torch.no_grad():
            return shapes_of(taps.pop(model(torch.zeros(2, in_channels, size, size))), model)
    finally:
        taps.remove()


def random_features(shapes: FeatureShapes, roles: frozenset[str], requires_grad: bool) -> Features:
    def draw(*shape: int) -> Tensor:
        return torch.randn(BATCH_SIZE, *shape).requires_grad_(requires_grad)

    def stages(role: str, role_shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
        return [draw(*shape) for shape in role_shapes] if role in roles else []

    return Features(logits=draw(shapes.num_classes),
                    stages=stages(STAGES, shapes.stages),
                    embedding=draw(*shapes.embedding) if EMBEDDING in roles else None,
                    preact_stages=stages(PREACT_STAGES, shapes.preact_stages),
                    postact_stages=stages(POSTACT_STAGES, shapes.postact_stages))


def check_setting_shapes(method_class: type[Method], setting: settings.Setting) -> None:
    shape = shape_of(setting.dataset, setting.dataset_options)
    in_channels, num_classes, size = shape.in_channels, shape.num_classes, shape.image_size
    student_shapes = architecture_shapes(setting.student, num_classes, in_channels, size)
    teacher_shapes = (architecture_shapes(setting.teacher, num_classes, in_channels, size)
                      if method_class.uses_teacher else None)
    torch.manual_seed(0)
    method = method_class(method_class.Config())
    method.build(student_shapes, teacher_shapes, NUM_TRAIN)
    method.observe_training_set(training_labels(num_classes))
    t = random_features(teacher_shapes, method_class.teacher_taps, False) if teacher_shapes else None
    batch = Batch(torch.zeros(BATCH_SIZE, in_channels, size, size),
                  torch.arange(BATCH_SIZE) % num_classes, torch.arange(BATCH_SIZE))
    stages = method.pretrain_stages()
    for stage in stages:
        s = (random_features(student_shapes, method_class.student_taps, True)
             if stage.student_up_to_stage is not None else None)
        terms = check_terms(stage.loss(s, t, batch), f"pre-training stage {stage.name!r}")
        torch.stack(list(terms.values())).sum().backward()
    s = random_features(student_shapes, method_class.student_taps, True)
    progress = Progress(0, 2, 0, 1, sum(stage.epochs for stage in stages))
    terms = check_terms(method.loss(s, t, batch, progress), "loss()")
    if terms:
        torch.stack(list(terms.values())).sum().backward()


# --- the model contract: `python -m kdbench.testing --model NAME` -------------------------------

MODEL_BATCH = 2
REQUIRED_ROLES = (STAGES, EMBEDDING)  # what every method family reads; the others are optional


def check_model(name: str, image_size: int = 32) -> None:
    """Check the architecture ``name`` (a ``kdbench.models`` plugin's, or a built-in) against
    what the engine relies on; AssertionError (ContractError) naming the promise it breaks:

    - it builds from (num_classes, in_channels) for 3 and 1 input channels, as an nn.Module
      whose forward maps (B, C, H, W) images to (B, num_classes) logits, in train and eval mode;
    - ``feature_points()`` maps ``stages`` and ``embedding`` (and, where it maps them,
      ``preact_stages`` and ``postact_stages`` with one tensor per stage), every point names a
      module (and a BatchNorm as its ``norm``), and each point fires once per forward pass;
    - the stage tensors are (B, C, H, W) maps and the embedding a (B, C) vector;
    - no tapped tensor is changed after it was tapped (an in-place op, ``out += x`` or
      ``relu_(out)``, would hand a method other values than the role's);
    - every tapped tensor and the logits carry gradients to the parameters, and the logits to
      every parameter (an unused parameter is dead weight that DistributedDataParallel refuses);
    - its state_dict loads into a fresh build (checkpoints, teachers)."""
    from kdbench.models import build_model as build
    from kdbench.roles import check_points, feature_points

    def fail(message: str) -> ContractError:
        return ContractError(f"model {name!r}: {message}")

    for in_channels in (3, 1):
        torch.manual_seed(0)
        try:
            model = build(name, NUM_CLASSES, in_channels)
        except UserError:
            raise
        except Exception as error:
            raise fail(f"building it with {NUM_CLASSES} classes and {in_channels} input channels "
                       f"raised {type(error).__name__}: {error}") from error
        declared = getattr(model, "feature_points", None)
        if not callable(declared):
            raise fail("declares no feature_points() (kdbench/roles.py)")
        points = feature_points(model)
        if not isinstance(points, dict):
            raise fail(f"feature_points() must return a dict of role -> TapPoints, got {points!r}")
        unknown = sorted(set(points) - ROLES)
        if unknown:
            raise fail(f"feature_points() maps unknown roles {unknown}; roles: {sorted(ROLES)}")
        missing = [role for role in REQUIRED_ROLES if not points.get(role)]
        if missing:
            raise fail(f"feature_points() maps no {', '.join(missing)}: every method family reads them")
        for role in (PREACT_STAGES, POSTACT_STAGES):
            if role in points and len(points[role]) != len(points[STAGES]):
                raise fail(f"feature_points() maps {len(points[role])} {role} for "
                           f"{len(points[STAGES])} stages: one per stage")
        if len(points[EMBEDDING]) != 1:
            raise fail(f"feature_points() maps {len(points[EMBEDDING])} embeddings: one")
        try:
            check_points(model, points)
        except ValueError as error:
            raise fail(str(error)) from None
        images = torch.randn(MODEL_BATCH, in_channels, image_size, image_size)
        for mode in ("train", "eval"):
            model.train(mode == "train")
            check_model_forward(model, points, images, fail, mode)
        twin = build(name, NUM_CLASSES, in_channels)
        try:
            twin.load_state_dict(model.state_dict())
        except Exception as error:
            raise fail(f"its state_dict does not load into a fresh build: {error}") from error


def check_model_forward(model: nn.Module, points, images: Tensor, fail, mode: str) -> None:
    modules = dict(model.named_modules())
    taken: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
    handles = []

    def keep(key, tensor):
        if not isinstance(tensor, Tensor):
            raise fail(f"{key[0]}[{key[1]}] ({mode} mode): the tap point gives a "
                       f"{type(tensor).__name__}, not a tensor")
        taken.setdefault(key, []).append((tensor, tensor.detach().clone()))

    for role, role_points in points.items():
        for index, point in enumerate(role_points):
            key = (role, index)
            module = modules[point.module]
            if point.read == "output":
                handles.append(module.register_forward_hook(
                    lambda m, i, o, key=key: keep(key, o)))
            else:
                handles.append(module.register_forward_pre_hook(
                    lambda m, i, key=key: keep(key, i[0])))
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    where = f"({mode} mode)"
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (len(images), NUM_CLASSES):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise fail(f"forward must return ({len(images)}, {NUM_CLASSES}) logits only {where}, got {shape}")
    for role, role_points in points.items():
        for index, point in enumerate(role_points):
            seen = taken.get((role, index), [])
            label = f"{role}[{index}] ({point.read} of {point.module!r}) {where}"
            if len(seen) != 1:
                raise fail(f"{label} fired {len(seen)} times in one forward pass: once, please "
                           "(a module called twice cannot be a tap point)")
            tensor, at_hook = seen[0]
            expected = 2 if role == EMBEDDING else 4
            if tensor.dim() != expected or tensor.shape[0] != len(images):
                raise fail(f"{label} has shape {tuple(tensor.shape)}: expected a "
                           f"({'B, C' if expected == 2 else 'B, C, H, W'}) tensor")
            if not torch.equal(tensor.detach(), at_hook):
                raise fail(f"{label} was changed in place after it was tapped: the methods would "
                           "read other values than the role's")
    if mode != "train":
        return
    parameters = [p for p in model.parameters() if p.requires_grad]
    for (role, index), [(tensor, _)] in taken.items():
        if not tensor.requires_grad:
            raise fail(f"{role}[{index}] carries no gradient to the parameters")
    grads = torch.autograd.grad(logits.float().square().mean(), parameters, allow_unused=True)
    named = {id(p): key for key, p in model.named_parameters()}
    unused = [named[id(p)] for p, g in zip(parameters, grads) if g is None]
    if unused:
        raise fail(f"parameters the logits do not depend on: {', '.join(unused[:4])}"
                   f"{' …' if len(unused) > 4 else ''}")


# --- `pytest --pyargs kdbench.testing` and `python -m kdbench.testing NAME ...` -----------------

def pytest_generate_tests(metafunc) -> None:  # a pytest hook: one test per registered method
    if "method_name" in metafunc.fixturenames:
        metafunc.parametrize("method_name", registry.names())


def test_method_contract(method_name: str) -> None:
    check_method(method_name)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdbench.testing [METHOD ...]`` checks methods (all registered ones without
    names); ``--model NAME`` (repeatable; ``--image-size N``, default 32) checks architectures."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kdbench.testing",
                                     description="Check methods, or architectures with --model, "
                                                 "against kdbench's plugin contract.")
    parser.add_argument("methods", nargs="*", help="method names (default: every registered one)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="check an architecture (a kdbench.models name) instead")
    parser.add_argument("--image-size", type=int, default=32, help="input side for --model (default 32)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if args.model:
        checks = [(name, lambda name=name: check_model(name, args.image_size)) for name in args.model]
    else:
        checks = [(name, lambda name=name: check_method(name)) for name in args.methods or registry.names()]
    if args.model and args.methods:
        parser.error("give methods or --model, not both")
    failed = 0
    for name, check in checks:
        try:
            check()
        except (AssertionError, UserError) as error:
            failed += 1
            print(f"FAIL {name}: {error}", flush=True)
        else:
            print(f"ok   {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
