"""The student alone: cross-entropy only. It is the "Student" row of every table."""

from __future__ import annotations

from dataclasses import dataclass

from kdbench.method import FIDELITY_PAPER, Method, MethodConfig


@dataclass(frozen=True)
class VanillaConfig(MethodConfig):
    pass


class Vanilla(Method):
    name = "vanilla"
    paper = "Student trained alone with cross-entropy (the baseline row)"
    display_name = "Student"
    fidelity = FIDELITY_PAPER
    fidelity_note = "cross-entropy on the labels under the setting's recipe; nothing to interpret"
    Config = VanillaConfig
    uses_teacher = False
