"""How the command lines (pretrain.py, finetune.py, linear_eval.py, push_to_hub.py) end: a mistake of the user's is
one line on stderr that says what is wrong and what would be right, and a non-zero exit status; the traceback only
with `--debug` or MOCO_HF_DEBUG=1. Errors that are not the user's (bugs) keep their traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

# Exit statuses: 2 a mistake in the arguments, the config or the data; 1 the machine (memory, disk); 130 Ctrl-C;
# 75 stopped by a scheduler's signal with the state saved (`training.PREEMPTED`: requeue and resume).
USAGE, MACHINE, INTERRUPTED = 2, 1, 130


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MOCO_HF_DEBUG", "") not in ("", "0")


def run_command(prog: str, fn: Callable[[], object], debug: bool = False) -> int:
    """Call `fn()`: its exit status when it returns one (an int), else 0; on an error, print it as one line and
    return the error's status."""
    try:
        result = fn()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted; complete checkpoints are kept (resume with --resume_from_checkpoint auto)",
              file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # noqa: BLE001 - sorted below: the user's mistakes become one line, bugs re-raise
        message, status = describe(err)
        if debug or message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def describe(err: BaseException) -> tuple[str | None, int]:
    """(one line for the user, exit status) for the errors a user can cause and fix; (None, 1) for the others."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return ("out of memory on the device: lower batch_size (or use more processes), or set mixed_precision bf16, "
                "gradient_checkpointing true or a smaller image_size"), MACHINE
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return (f"no space left on the disk{where}: free some space or choose another output_dir; complete "
                "checkpoints are kept"), MACHINE
    if isinstance(err, PermissionError):
        where = f" {err.filename}" if err.filename else ""
        return f"permission denied{where}: choose an output_dir you can write to", USAGE
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)):
        text = str(err).strip().splitlines()
        return (text[0] if text else type(err).__name__), USAGE
    return None, MACHINE


__all__ = ["debug_requested", "describe", "run_command"]
