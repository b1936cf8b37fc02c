"""benchmarks/summarize.py reads the logs of the GPU suite into one table against the issue's targets."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import summarize


def test_summary_of_the_recorded_h100_logs():
    rows = {(what, how): (value, verdict)
            for what, how, value, verdict in summarize.summarize([os.path.join(ROOT, "benchmarks", "results")])}
    step = "model step, resnet50 224 px, batch 256, K 65,536"
    assert round(rows[step, "moco_hf"][0]) == 4004 and round(rows[step, "official-style"][0]) == 1348
    assert "2.97x" in rows[step, "moco_hf"][1] and "target 3,800: met" in rows[step, "moco_hf"][1]
    e2e = rows["resnet50, 224 px v2, batch 256", "pretrain.py end to end, device path (workers decode)"]
    assert round(e2e[0]) == 2459 and "NOT met" in e2e[1]
    cifar = rows["cifar_resnet18, 32 px cifar, batch 512", "pretrain.py end to end, device cache"]
    assert round(cifar[0]) == 12530 and "target 30,000: NOT met" in cifar[1]


def test_targets_only_judge_the_setting_they_are_for(tmp_path):
    (tmp_path / "step_r50_compile.txt").write_text(
        "device cpu (2 threads); torch 2; test_resnet, batch 16 x 32px, K=64, amp=True, bn_splits=1\n"
        "moco_hf MoCoModel   10.0   9.0   5000.0   nan\nofficial-style   20.0   19.0   2500.0   nan\n")
    (what, _, value, verdict), _ = summarize.summarize([str(tmp_path)])
    assert what == "model step, test_resnet 32 px, batch 16, K 64" and value == 5000.0
    assert verdict == "2.00x the official-style step; target 3,800 is for resnet50"
    assert summarize.main([str(tmp_path / "missing")]) == 1


def test_cuda_graph_runs_are_labelled_with_their_compile_mode(tmp_path):
    (tmp_path / "step_cifar_cudagraphs.txt").write_text(
        "device cuda (H100); torch 2; cifar_resnet18, batch 512 x 32px, K=4096, amp=True, channels_last=True, "
        "compile=True (reduce-overhead), bn_splits=8\n"
        "moco_hf MoCoModel   20.0   19.0   25600.0   1.5\nofficial-style   40.0   39.0   12800.0   3.0\n")
    (tmp_path / "e2e_cifar_cache_cudagraphs.txt").write_text(
        "device cuda (H100), torch 2, backbone cifar_resnet18, 32 px cifar, batch 512, 15 workers, mixed precision "
        "bf16, compile True (reduce-overhead)\n"
        "| pretrain.py end to end, device cache | 31000.0 | 2% of the time in data |\n")
    (tmp_path / "step_cifar_compile.txt").write_text(
        "device cuda (H100); torch 2; cifar_resnet18, batch 512 x 32px, K=4096, amp=True, channels_last=True, "
        "compile=True (default), bn_splits=8\n"
        "moco_hf MoCoModel   30.0   29.0   17000.0   1.5\n")
    rows = {(what, how): (value, verdict) for what, how, value, verdict in summarize.summarize([str(tmp_path)])}
    step = "model step, cifar_resnet18 32 px, batch 512, K 4,096, split BN 8"
    assert rows[step, "moco_hf"][0] == 17000.0  # the default mode keeps the plain label
    assert rows[step, "moco_hf (reduce-overhead)"] == (25600.0, "2.00x the official-style step; peak 1.5 vs 3.0 GiB")
    e2e = rows["cifar_resnet18, 32 px cifar, batch 512", "pretrain.py end to end, device cache (reduce-overhead)"]
    assert e2e == (31000.0, "2% of the time in data; target 30,000: met")
