"""Checkpoint folders (`moco_hf.run_folder.save_checkpoint`): which one `auto` resumes, what pruning keeps, and what
a crash or power loss can leave behind."""

import json
import os

import pytest

from moco_hf import run_folder
from moco_hf.run_folder import list_checkpoints, resolve_resume, save_checkpoint


class FakeAccelerator:
    """The part of `accelerate.Accelerator` that `save_checkpoint` uses; `save_state` writes which run saved it."""

    is_main_process = True

    def __init__(self, run: str):
        self.run = run

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir, safe_serialization=True):
        os.makedirs(output_dir, exist_ok=True)
        for name in ("model.safetensors", "optimizer.bin"):
            with open(os.path.join(output_dir, name), "w") as f:
                f.write(self.run)


def steps(out) -> list[int]:
    return [int(os.path.basename(path).split("-")[1]) for path in list_checkpoints(str(out))]


def run_of(path) -> str:
    with open(os.path.join(path, "model.safetensors")) as f:
        return f.read()


def test_a_run_resumed_from_an_older_checkpoint_is_what_auto_resumes_next(tmp_path):
    first, second = FakeAccelerator("first"), FakeAccelerator("second")
    for step in (300, 400, 500):
        save_checkpoint(first, str(tmp_path), step, total_limit=3)
    # resumed by hand from 300: the new run's saves are the newest, although 400 and 500 have higher steps
    save_checkpoint(second, str(tmp_path), 350, total_limit=3)
    assert steps(tmp_path) == [400, 500, 350]  # pruning dropped the oldest save (300), not the lowest step
    assert resolve_resume("auto", str(tmp_path)).endswith("checkpoint-00000350")
    save_checkpoint(second, str(tmp_path), 400, total_limit=3)  # the same step again: replaced by the new run
    assert steps(tmp_path) == [500, 350, 400]
    latest = resolve_resume("auto", str(tmp_path))
    assert latest.endswith("checkpoint-00000400") and run_of(latest) == "second"
    save_checkpoint(second, str(tmp_path), 450, total_limit=3)
    assert steps(tmp_path) == [350, 400, 450]  # the abandoned run's last checkpoint is pruned first
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [f"checkpoint-00000{s}" for s in (350, 400, 450)]


def test_checkpoints_from_before_the_save_order_sort_first(tmp_path):
    save_checkpoint(FakeAccelerator("new"), str(tmp_path), 5, total_limit=5)
    legacy = tmp_path / "checkpoints" / "checkpoint-00000009"
    legacy.mkdir()
    (legacy / run_folder.COMPLETE_MARKER).write_text(json.dumps({"step": 9}))  # the marker's older format
    assert steps(tmp_path) == [9, 5]
    save_checkpoint(FakeAccelerator("new"), str(tmp_path), 6, total_limit=5)
    assert steps(tmp_path) == [9, 5, 6]


def test_leftovers_of_crashed_saves_are_removed_by_the_next_save(tmp_path):
    root = tmp_path / "checkpoints"
    for name in (".tmp-checkpoint-00000367", ".old-checkpoint-00000100"):  # other steps than the next save's
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_text("half-written")
    assert resolve_resume("auto", str(tmp_path)) is None
    save_checkpoint(FakeAccelerator("run"), str(tmp_path), 400, total_limit=3)
    assert sorted(os.listdir(root)) == ["checkpoint-00000400"]


def test_every_file_is_on_disk_before_the_marker_and_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(run_folder.os, "fsync", fsync)
    monkeypatch.setattr(run_folder.os, "replace", replace)
    final = save_checkpoint(FakeAccelerator("run"), str(tmp_path), 7, total_limit=3)
    synced = [os.path.basename(path) for kind, path in events if kind == "fsync"]
    marker = synced.index(run_folder.COMPLETE_MARKER)
    assert {"model.safetensors", "optimizer.bin"} <= set(synced[:marker])  # data first, then the marker
    rename = events.index(("replace", final))
    assert ("fsync", str(tmp_path / "checkpoints" / ".tmp-checkpoint-00000007")) in events[:rename]
    assert events[rename + 1] == ("fsync", str(tmp_path / "checkpoints"))  # the rename itself made durable


@pytest.mark.parametrize("limit", [1, 2])
def test_pruning_keeps_the_newest_saves(tmp_path, limit):
    for step in (1, 2, 3, 4):
        save_checkpoint(FakeAccelerator("run"), str(tmp_path), step, total_limit=limit)
    assert steps(tmp_path) == [1, 2, 3, 4][-limit:]
