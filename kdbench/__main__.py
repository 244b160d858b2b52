import os
import sys

from kdbench.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:
    # `kdbench list | head`: the reader left. Say nothing more (as cat or grep do): point
    # stdout at /dev/null so the interpreter's final flush does not fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 141  # 128 + SIGPIPE, what a shell reports for a pipe's early writer
raise SystemExit(code)
