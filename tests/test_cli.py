"""The first hour with the command lines: every mistake is one line and a non-zero exit, `--help` and argument
errors come back before the heavy libraries are imported, no run overwrites another, a failing call writes
nothing, and what a run writes others can read."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import finetune  # noqa: E402
import linear_eval  # noqa: E402
import pretrain  # noqa: E402
import push_to_hub  # noqa: E402
from moco_hf import pretraining  # noqa: E402
from moco_hf.modeling_moco import MoCoEncoder  # noqa: E402
from moco_hf.run_folder import list_checkpoints  # noqa: E402

from _tiny import TINY  # noqa: E402

QUICK = ["--max_steps", "2", "--eval_split", "none"]


def run_main(main, args, capsys) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# --help and argument errors before any heavy import
# ---------------------------------------------------------------------------------------------------------

HEAVY = ("torch", "transformers", "timm", "datasets", "accelerate", "moco_hf")


@pytest.mark.parametrize("script, args", [
    ("pretrain", ["--help"]),
    ("pretrain", ["--batch_size", "abc"]),
    ("pretrain", ["--config", "configs/no_such.yaml"]),
    ("linear_eval", ["--help"]),
    ("linear_eval", ["--model_dir", "x", "--epochs", "0"]),
    ("push_to_hub", ["--help"]),
])
def test_help_and_argument_errors_import_no_heavy_library(script, args):
    """What makes `--help` take 15 s is importing torch, timm, transformers: the scripts answer before that."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import {script}\n"
            f"try:\n    status = {script}.main({args!r})\nexcept SystemExit as e:\n    status = e.code\n"
            f"print('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules), 'STATUS', status)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("IMPORTED [] STATUS"), (last, result.stderr[-2000:])
    assert last.endswith("STATUS 0" if "--help" in args else "STATUS 2")


def test_help_lists_every_key_with_its_default_and_description(capsys):
    assert pretrain.main(["--help"]) == 0
    text = capsys.readouterr().out
    for field in pretrain.dataclasses.fields(pretrain.PretrainConfig):
        line = next(line for line in text.splitlines() if line.startswith(f"  --{field.name} "))
        assert "(default: " in line and len(line.split(")")[0]) > len(f"  --{field.name} ") + 20, line
    # the example commands stay on their own lines
    assert "\n    python pretrain.py     " in text and "\n    accelerate launch --num_processes 8" in text


# ---------------------------------------------------------------------------------------------------------
# One clear line for every mistake
# ---------------------------------------------------------------------------------------------------------


def test_config_mistakes(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("batch_size: 64\nbackbone: [resnet50\n")
    cases = [
        (["--config", str(bad_yaml)], "not valid YAML at line"),
        (["--config", str(tmp_path / "missing.yaml")], "not found"),
        (["--config"], "--config needs a YAML file"),
        (["--batch_size", "-3"], "batch_size must be >= 1"),
        (["--momentum", "1.5"], "momentum must be in [0, 1]"),
        (["--symmetric", "maybe"], "expects true or false"),
        (["--backbone_kwargs", "[1, 2]"], "expects a dict"),
        (["--dataset_name", "x/y", "--train_dir", "/tmp"], "not both"),
        (["--resume_from_checkpoint", "auto", "--overwrite_output_dir", "true"], "set one"),
    ]
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("batch_size: [1, 2]\n")
    cases.append((["--config", str(wrong_type)], "batch_size expects int"))
    for args, message in cases:
        code, err = run_main(pretrain.main, TINY + ["--output_dir", str(tmp_path / "out"), *args], capsys)
        assert code == 2 and message in one_line(err), (args, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--dataset_name", "user/no-such-dataset"], "HF_HUB_OFFLINE"),  # the tests run offline: no network either way
    (["--train_dir", "/nonexistent/folder"], "does not exist"),
    (["--backbone", "resnet_5O"], "not a timm architecture"),
    (["--backbone", "vit_tiny_patch16_224"], "--backbone_kwargs '{img_size: 32}'"),
    (["--batch_size", "4096", "--queue_size", "8192"], "fewer than batch_size"),
    (["--report_to", "wandb"], "wandb"),
    (["--mixed_precision", "fp16"], "needs a CUDA GPU"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-00000001"], "not a complete checkpoint"),
])
def test_run_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    if args[:2] == ["--report_to", "wandb"]:
        pytest.importorskip("tensorboard")
        if __import__("importlib").util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
    code, err = run_main(pretrain.main, TINY + ["--output_dir", str(tmp_path / "out"), *QUICK, *args], capsys)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "out").exists()  # validated before the first write


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    code, err = run_main(pretrain.main, TINY + ["--output_dir", str(tmp_path / "taken"), *QUICK], capsys)
    assert code == 2 and "taken" in one_line(err)
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        pretrain.main(TINY + ["--output_dir", str(tmp_path / "out"), "--train_dir", "/nonexistent", "--debug"])


def test_other_scripts_mistakes(tmp_path, capsys):
    code, err = run_main(push_to_hub.main, ["--model_dir", str(tmp_path / "none"), "--repo_id", "u/m", "--dry_run",
                                            str(tmp_path / "staged")], capsys)
    assert code == 1 and "does not exist" in one_line(err) and not (tmp_path / "staged").exists()
    code, err = run_main(linear_eval.main, ["--model_dir", str(tmp_path / "none"), "--epochs", "0"], capsys)
    assert code == 2 and "epochs must be a positive integer" in one_line(err)
    code, err = run_main(finetune.main, ["--model_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and "is not a folder" in one_line(err)


# ---------------------------------------------------------------------------------------------------------
# No run overwrites another
# ---------------------------------------------------------------------------------------------------------


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    common = TINY + ["--output_dir", str(out), *QUICK, "--save_steps", "1", "--save_total_limit", "5"]
    assert pretrain.main(common) == 0
    capsys.readouterr()
    before = _snapshot(out)

    for args in ([], ["--seed", "1"], ["--resume_from_checkpoint", "auto", "--batch_size", "8"]):
        code, err = run_main(pretrain.main, common + args, capsys)
        line = one_line(err)
        assert code == 2 and str(out) in line and "--overwrite_output_dir" in line, line
        assert "another configuration" in line if "--resume_from_checkpoint" in args else "holds" in line
    assert _snapshot(out) == before  # not a byte changed, config.yaml included

    # resuming the same run is allowed (here: already at its last step, it only re-saves final/)
    assert pretrain.main(common + ["--resume_from_checkpoint", "auto", "--log_steps", "1"]) == 0

    # --overwrite_output_dir starts over: the old run's checkpoints are gone, not mixed with the new ones
    assert pretrain.main(common + ["--overwrite_output_dir", "true", "--max_steps", "3", "--save_steps", "3"]) == 0
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-00000003"]
    assert json.loads((out / "final" / "metrics.json").read_text())["steps"] == 3


def test_a_finished_run_without_checkpoints_cannot_be_resumed_into(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(TINY + ["--output_dir", str(out), *QUICK]) == 0
    capsys.readouterr()
    code, err = run_main(pretrain.main, TINY + ["--output_dir", str(out), *QUICK, "--resume_from_checkpoint", "auto"],
                         capsys)
    assert code == 2 and "no checkpoint to resume from" in one_line(err)


def test_finetune_and_linear_eval_refuse_a_finished_output_dir(tmp_path, capsys):
    model_dir = tmp_path / "run" / "final"
    assert pretrain.main(TINY + ["--output_dir", str(tmp_path / "run"), *QUICK]) == 0
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "metrics.json").write_text('{"finetune_top1": 99.0}')
    capsys.readouterr()
    code, err = run_main(finetune.main, ["--model_dir", str(model_dir), "--output_dir", str(done)], capsys)
    assert code == 2 and "holds a finished run" in one_line(err)
    code, err = run_main(linear_eval.main, ["--model_dir", str(model_dir), "--output_dir", str(done), "--epochs", "1",
                                            "--schedule", "1", "--cached_features", "--num_workers", "0"], capsys)
    assert code == 2 and "holds a finished run" in one_line(err)
    assert json.loads((done / "metrics.json").read_text()) == {"finetune_top1": 99.0}


# ---------------------------------------------------------------------------------------------------------
# What a run writes
# ---------------------------------------------------------------------------------------------------------


def test_published_files_follow_the_umask_and_compile_is_not_run_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(MoCoEncoder, "compile", lambda self, **kwargs: pytest.fail("compiled on a CPU"))
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert pretrain.main(TINY + ["--output_dir", str(out), *QUICK, "--save_steps", "2", "--compile", "true"]) == 0
        assert "compile: true is for GPUs" in capsys.readouterr().out
        staged = tmp_path / "staged"
        assert push_to_hub.main(["--model_dir", str(out / "final"), "--repo_id", "u/m", "--dry_run", str(staged)]) == 0
    finally:
        os.umask(old)
    weights = [out / "final" / "model.safetensors", staged / "model.safetensors",
               staged / "backbone" / "model.safetensors", *(out / "checkpoints").rglob("*.safetensors")]
    assert len(weights) >= 4
    for path in weights:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_training_curves_show_single_points_and_the_random_init_reference(tmp_path):
    history = {"step": [4], "loss": [5.2], "knn_step": [4], "knn": [71.0]}
    figure = pretraining.plot_history(history, str(tmp_path / "curves.png"), random_init=42.0, eval_split="test")
    loss, knn = figure.axes
    assert loss.lines[0].get_marker() == "o"  # one point is still drawn
    assert any("random init" in str(line.get_label()) and list(line.get_ydata()) == [42.0, 42.0]
               for line in knn.lines)
    assert "%" in knn.get_ylabel() and "held-out" in knn.get_title() and "nats" in loss.get_ylabel()
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_one_line_for_out_of_memory_and_a_full_disk():
    import errno

    from moco_hf.cli import describe

    message, status = describe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert status == 1 and "lower batch_size" in message
    message, status = describe(OSError(errno.ENOSPC, "No space left on device", "/out/checkpoints/x"))
    assert status == 1 and "no space left" in message and "/out/checkpoints/x" in message
    assert describe(RuntimeError("a bug"))[0] is None  # not the user's: keeps its traceback
