"""Forward hooks that collect the features a method asked for, by role.

Models stay plain (x -> logits; torchdistill's hook manager and timm's ``feature_info`` are
the models for this): each architecture names its stage modules (``stage_names``) and its
classifier (``classifier_name``) once, and hooks are installed only for the roles a method
declared. Collected tensors are popped every step ("clear after reading"), so no step keeps a
reference to the previous step's graph.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdbench.method import EMBEDDING, ROLES, STAGES, Features


class FeatureTaps:
    def __init__(self, model: nn.Module, roles: frozenset[str] | set[str]) -> None:
        unknown = set(roles) - ROLES
        if unknown:
            raise ValueError(f"unknown feature roles {sorted(unknown)}; known: {sorted(ROLES)}")
        self.roles = frozenset(roles)
        self._stages: dict[int, Tensor] = {}
        self._embedding: Tensor | None = None
        self._handles: list[RemovableHandle] = []
        modules = dict(model.named_modules())
        if STAGES in self.roles:
            for index, name in enumerate(model.stage_names):
                self._handles.append(modules[name].register_forward_hook(self._stage_hook(index)))
        if EMBEDDING in self.roles:
            classifier = modules[model.classifier_name]
            self._handles.append(classifier.register_forward_pre_hook(self._embedding_hook))

    def _stage_hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._stages[index] = output

        return hook

    def _embedding_hook(self, module: nn.Module, inputs: tuple) -> None:
        self._embedding = inputs[0]

    def pop(self, logits: Tensor) -> Features:
        """The features of the forward pass that produced ``logits``; clears the taps."""
        stages = [self._stages[index] for index in sorted(self._stages)]
        features = Features(logits=logits, stages=stages, embedding=self._embedding)
        self._stages = {}
        self._embedding = None
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
    )


def forward_with_features(model: nn.Module, taps: FeatureTaps, images: Tensor) -> Features:
    return taps.pop(model(images))
