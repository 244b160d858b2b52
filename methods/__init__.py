"""kdbench's built-in distillation methods, one file each, registered in pyproject.toml."""
