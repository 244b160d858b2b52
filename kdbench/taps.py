"""Forward hooks that collect the features a method asked for, by role.

Models stay plain (x -> logits; torchdistill's hook manager and timm's ``feature_info`` are
the models for this): each architecture declares once, in ``feature_points()``, which module's
output or input is each role's tensor (kdbench/roles.py), and hooks are installed only for the
roles a method declared: a forward hook for an output, a forward pre-hook for an input.
Collected tensors are popped every step ("clear after reading"), so no step keeps a reference
to the previous step's graph.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdbench.method import EMBEDDING, POSTACT_STAGES, PREACT_STAGES, ROLES, STAGES, Features
from kdbench.roles import TapPoint, check_points, feature_points

def has_in_place_modules(model: nn.Module) -> bool:
    """Whether any module of ``model`` overwrites its input (``nn.ReLU(inplace=True)`` and the
    like). The zoo's models have none (tests/test_models.py); a model plugin may."""
    return any(getattr(module, "inplace", False) for module in model.modules())


class FeatureTaps:
    def __init__(self, model: nn.Module, roles: frozenset[str] | set[str]) -> None:
        unknown = set(roles) - ROLES
        if unknown:
            raise ValueError(f"unknown feature roles {sorted(unknown)}; known: {sorted(ROLES)}")
        self.roles = frozenset(roles)
        points = feature_points(model)
        unmapped = sorted(self.roles - set(points))
        if unmapped:
            raise ValueError(f"{type(model).__name__} maps no tap points for the roles {unmapped} "
                             "(its feature_points() must cover every role a method asks for)")
        self.points: dict[str, tuple[TapPoint, ...]] = {role: tuple(points[role]) for role in self.roles}
        check_points(model, self.points)
        # A tapped tensor that an in-place op later overwrites would reach the method with the
        # wrong values (and the wrong autograd history, silently): where the model has in-place
        # modules, every tapped tensor is cloned (an autograd-tracked copy, gradients flow).
        # In-place *functional* ops (``out += x``) cannot be seen here: a model must not apply
        # them to a tensor it declares as a tap point.
        self.clones = has_in_place_modules(model)
        self._collected: dict[str, dict[int, Tensor]] = {role: {} for role in self.roles}
        self._handles: list[RemovableHandle] = []
        modules = dict(model.named_modules())
        for role, role_points in self.points.items():
            for index, point in enumerate(role_points):
                module = modules[point.module]
                if point.read == "output":
                    handle = module.register_forward_hook(self._output_hook(role, index))
                else:
                    handle = module.register_forward_pre_hook(self._input_hook(role, index))
                self._handles.append(handle)

    def _keep(self, role: str, index: int, tensor: Tensor) -> None:
        self._collected[role][index] = tensor.clone() if self.clones else tensor

    def _output_hook(self, role: str, index: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._keep(role, index, output)

        return hook

    def _input_hook(self, role: str, index: int):
        def hook(module: nn.Module, inputs: tuple) -> None:
            self._keep(role, index, inputs[0])

        return hook

    def _ordered(self, role: str) -> list[Tensor]:
        collected = self._collected.get(role, {})
        return [collected[index] for index in sorted(collected)]

    def pop(self, logits: Tensor) -> Features:
        """The features of the forward pass that produced ``logits``; clears the taps."""
        embedding = self._collected.get(EMBEDDING, {}).get(0)
        features = Features(logits=logits, stages=self._ordered(STAGES), embedding=embedding,
                            preact_stages=self._ordered(PREACT_STAGES),
                            postact_stages=self._ordered(POSTACT_STAGES))
        self._collected = {role: {} for role in self.roles}
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def as_float32(features: Features | None) -> Features | None:
    """The same features in fp32, for the loss.

    Under bf16 autocast the networks' outputs are bf16; losses, softmax with temperature,
    distances, attention maps and a method's own modules (regressors, attention networks) are
    computed from these fp32 copies outside autocast, so no method has to remember to upcast
    and none runs a matmul of its loss in bf16. In fp32 ``.float()`` returns the tensor itself:
    no copy, no change."""
    if features is None:
        return None
    return Features(
        logits=features.logits.float(),
        stages=[stage.float() for stage in features.stages],
        embedding=features.embedding.float() if features.embedding is not None else None,
        preact_stages=[stage.float() for stage in features.preact_stages],
        postact_stages=[stage.float() for stage in features.postact_stages],
    )


def forward_with_features(model: nn.Module, taps: FeatureTaps, images: Tensor) -> Features:
    return taps.pop(model(images))
