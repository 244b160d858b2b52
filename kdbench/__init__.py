"""kdbench: knowledge-distillation methods compared over seeds, with the statistics."""

__version__ = "0.1.0"
