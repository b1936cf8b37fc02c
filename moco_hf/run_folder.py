"""The output folder of a run: checkpoints that a crash never leaves half-written, a new run that never overwrites
another's results, and files readable as the user's umask says.

- `save_checkpoint`, `list_checkpoints`, `resolve_resume`: `checkpoints/checkpoint-<step, 8 digits>`, each written
  into a temporary folder, synced, marked complete and renamed into place.
- `check_output_dir` (pretrain.py), `check_model_output_dir` (finetune.py, linear_eval.py): refuse a folder that
  holds another run unless the user resumes it or says `--overwrite_output_dir`; nothing is written here, so a
  refused or failing call leaves the folder as it was.
- `clear_run`: what `--overwrite_output_dir` deletes, once every check has passed.
- `share_files`: safetensors (and so `save_pretrained`) writes its files with mode 0600; published and shared files
  get the mode the user's umask gives new files (0644 with the usual 022).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import yaml

# What pretrain.py writes into its output_dir (TensorBoard logs go to moco/, profiles to profile/).
PRETRAIN_ARTEFACTS = ("final", "checkpoints", "config.yaml", "training_curves.png", "moco", "profile")
# What a save_pretrained folder of a finished fine-tuning or linear evaluation holds.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "metrics.json")
RUN_CONFIG = "config.yaml"


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed into place
# ---------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step:08d}")


def _saved_order(path: str) -> int:
    """The save number a checkpoint's marker records (0 for markers from before it was recorded)."""
    try:
        with open(os.path.join(path, COMPLETE_MARKER)) as f:
            return int(json.load(f).get("saved", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in the order they were saved, oldest first. After a resume from an older checkpoint,
    the resumed run's saves come after the abandoned run's later steps. Half-written ones (temporary names, no
    marker) are never listed."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            found.append((_saved_order(path), int(match.group(1)), path))
    return [path for *_, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: `auto` -> the last complete one saved (or None), a path -> itself."""
    if not resume:
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume, COMPLETE_MARKER)):
        raise FileNotFoundError(f"resume_from_checkpoint {resume!r} is not a complete checkpoint folder")
    return resume


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int, run_config: dict | None = None) -> str:
    """accelerator.save_state into `.tmp-...` (with `run_config` as its config.yaml, which a resume is checked
    against), every file synced to disk, then a COMPLETE marker, then an atomic rename; prune the oldest saves beyond
    `total_limit`.

    A crash, Ctrl-C or power loss at any point leaves the previous checkpoints alone, plus at most a `.tmp-` (or
    `.old-`) folder that `resolve_resume` ignores and the next save removes.
    """
    final = checkpoint_dir(output_dir, step)
    root = os.path.dirname(final)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of saves that crashed, at this step or any other
            if name.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run_config is not None:
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                yaml.safe_dump(run_config, f, sort_keys=False)
        share_files(tmp)
        for folder, _, files in os.walk(tmp):  # the data is on disk before the marker that vouches for it
            for name in files:
                _fsync(os.path.join(folder, name))
        saved = max((_saved_order(path) for path in list_checkpoints(output_dir)), default=0) + 1
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            f.write(json.dumps({"step": step, "saved": saved}))
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp, directory=True)
        old = None
        if os.path.exists(final):  # the same step saved again (a run resumed from an older checkpoint)
            old = os.path.join(root, f".old-{os.path.basename(final)}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root, directory=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        checkpoints = list_checkpoints(output_dir)
        for stale in checkpoints[: max(0, len(checkpoints) - max(1, total_limit))]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _ways_out(resumable: bool) -> str:
    resume = "resume it with --resume_from_checkpoint auto, " if resumable else ""
    return f"{resume}start over with --overwrite_output_dir true (deletes it), or choose another --output_dir"


def write_run_config(output_dir: str, config: dict) -> str:
    """`output_dir/config.yaml`, the resolved config of the run (checked against when it is resumed)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_CONFIG)
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def read_run_config(path: str) -> dict | None:
    """A run's saved config (config.yaml), or None where there is none or it cannot be read."""
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool, config: dict,
                     may_change: tuple[str, ...] = ()) -> str | None:
    """Refuse (ValueError naming the folder and the ways out) an `output_dir` that holds a finished run or
    checkpoints, unless `overwrite`; when resuming, refuse a checkpoint whose run config differs from `config` in
    any key but `may_change` (keys the saved config lacks, from an older version, count as equal).

    Returns the checkpoint to resume from (None: start at step 0)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a folder; choose another --output_dir")
    has_final = os.path.isdir(os.path.join(output_dir, "final"))
    checkpoints = list_checkpoints(output_dir)
    if overwrite:
        return None
    if resume:
        path = resolve_resume(resume, output_dir)
        if path is None:
            if has_final:
                raise ValueError(f"output_dir {output_dir!r} holds a finished run (final/) and no checkpoint to "
                                 f"resume from; {_ways_out(False)}")
            return None
        saved = read_run_config(os.path.join(path, RUN_CONFIG)) or read_run_config(
            os.path.join(os.path.dirname(os.path.dirname(path)), RUN_CONFIG))
        changed = [(k, v) for k, v in config.items() if saved and k in saved and k not in may_change and saved[k] != v]
        if changed:
            shown = "; ".join(f"{k}: {saved[k]!r} there, {v!r} now" for k, v in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ValueError(f"checkpoint {path!r} is of another configuration ({shown}{more}); resume with the "
                             f"same settings, or {_ways_out(False)}")
        return path
    if has_final or checkpoints:
        held = ", ".join(filter(None, ["a finished run (final/)" if has_final else "",
                                       f"{len(checkpoints)} checkpoint(s)" if checkpoints else ""]))
        raise ValueError(f"output_dir {output_dir!r} holds {held} of another run; {_ways_out(bool(checkpoints))}")
    return None


def check_model_output_dir(output_dir: str, overwrite: bool, resume: bool = False) -> None:
    """finetune.py / linear_eval.py: refuse an `output_dir` holding a saved model or Trainer checkpoints, unless
    `overwrite` or (Trainer checkpoints) `resume`."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a folder; choose another --output_dir")
    if overwrite or not os.path.isdir(output_dir):
        return
    names = os.listdir(output_dir)
    model = [n for n in names if n in MODEL_FILES]
    checkpoints = [n for n in names if n.startswith("checkpoint-")]
    if model and not resume:
        raise ValueError(f"output_dir {output_dir!r} holds a finished run ({', '.join(sorted(model))}); "
                         f"{_ways_out(False)}")
    if checkpoints and not resume:
        raise ValueError(f"output_dir {output_dir!r} holds {len(checkpoints)} checkpoint(s) of another run; "
                         f"{_ways_out(True)}")


def clear_run(output_dir: str, names: tuple[str, ...] = PRETRAIN_ARTEFACTS, trainer_checkpoints: bool = False
              ) -> list[str]:
    """Delete a previous run's files `names` (and with `trainer_checkpoints` Trainer's `checkpoint-*` folders) from
    `output_dir`; other files are left alone. Returns what was deleted."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        if name in names or (trainer_checkpoints and name.startswith("checkpoint-")):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_files(path: str | os.PathLike) -> None:
    """Give every file under `path` (or the file itself) the mode new files get from the user's umask (0644 with
    022), and folders theirs (0755): safetensors writes 0600, which other users of a shared machine cannot read."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if os.path.isfile(path):
        os.chmod(path, file_mode)
        return
    for folder, dirs, files in os.walk(path):
        os.chmod(folder, dir_mode)
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


__all__ = ["check_model_output_dir", "check_output_dir", "checkpoint_dir", "clear_run", "list_checkpoints",
           "read_run_config", "resolve_resume", "save_checkpoint", "share_files", "write_run_config"]
