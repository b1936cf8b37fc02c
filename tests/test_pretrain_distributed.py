"""Two processes (gloo, CPU) through pretrain.py: disjoint data per rank, identical queues at the end."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r'''
import json, os, sys
sys.path.insert(0, {root!r})
import torch
import pretrain
from moco_hf import pretraining
from pretrain import load_config

out = sys.argv[1]
cfg = load_config(None, ["--backbone", "test_resnet", "--embed_dim", "16", "--queue_size", "64",
                         "--batch_size", "16", "--max_steps", "3", "--log_steps", "1", "--report_to", "none",
                         "--eval_split", "none", "--num_shards", "4", "--output_dir", out, "--save_steps", "3",
                         "--symmetric", "false",
                         *sys.argv[2:]])
result = pretrain.train(cfg)
rank = int(os.environ["RANK"])
torch.save({{"queue": result.model.queue, "ptr": result.model.queue_ptr,
            "key": result.model.key_encoder.state_dict(), "query": result.model.query_encoder.state_dict()}},
           os.path.join(out, f"rank{{rank}}.pt"))

# The exact per-rank stream that training read: which files does each rank see in one epoch?
from accelerate import PartialState
state = PartialState()
stats = pretraining.data_stats(result.model)
dataset, _, num_examples = pretraining.build_train_loader(cfg, state, stats)
dataset.set_epoch(0)
paths = [example[dataset.image_column]["path"] for example in dataset.hf_dataset]
with open(os.path.join(out, f"paths{{rank}}.json"), "w") as f:
    json.dump({{"paths": paths, "num_examples": num_examples}}, f)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The batched (device) path with the split cached per process, as on GPUs; the per-rank stream that the CPU path's
# DataLoader workers read is the `paths` check below and tests/test_cluster.py's shard tests (a second two-process
# run through the CPU augmentation repeated these checks on the other view path for half a minute of the suite).
@pytest.mark.parametrize("extra", [["--gpu_augment", "on", "--device_cache", "on", "--bn_splits", "2"]],
                         ids=["device_cache"])
def test_two_process_run(tmp_path, extra):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(driver), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "global batch 16 = 2 x 8" in proc.stdout
    assert ("device cache:" in proc.stdout) == bool(extra)  # both processes cached their part, or neither

    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert int(ranks[0]["ptr"]) == int(ranks[1]["ptr"]) == 3 * 16 % 64  # every rank enqueued the global batch
    for part in ("key", "query"):
        for name, tensor in ranks[0][part].items():
            if tensor.is_floating_point() and "running" not in name:
                # all-reduce hands every rank the same gradient bytes: the same steps give the same bits
                assert torch.equal(tensor, ranks[1][part][name]), (part, name)

    # The checkpoint holds every rank's data position (custom state is written by the main process only).
    from moco_hf.run_folder import list_checkpoints

    checkpoint = list_checkpoints(str(out))[-1]
    state = torch.load(os.path.join(checkpoint, "custom_checkpoint_1.pkl"), weights_only=False)
    assert state["step"] == 3 and len(state["positions"]) == 2

    seen = [json.loads((out / f"paths{r}.json").read_text()) for r in (0, 1)]
    a, b = set(seen[0]["paths"]), set(seen[1]["paths"])
    assert a and b and not (a & b), "ranks must read disjoint examples"
    assert len(a) + len(b) == seen[0]["num_examples"], "together the ranks read every example once"
