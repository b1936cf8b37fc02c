"""Many processes, many machines, shared clusters: each process reads only its share of the shards, 2 machines x 2
processes train exactly as 1 x 4 and as one process with the same global batch, and a scheduler's signal ends a run
with a complete checkpoint from which `auto` resumes exactly."""

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrain  # noqa: E402
from moco_hf import pretraining  # noqa: E402
from moco_hf.data.sources import ProcessShards, load_source, rank_shards  # noqa: E402
from moco_hf.run_folder import list_checkpoints  # noqa: E402
from moco_hf.training import PREEMPTED  # noqa: E402

from _tiny import TINY  # noqa: E402
from _tolerance import tolerance  # noqa: E402


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (value % 256, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_webdataset(root, shards: int, per_shard: int) -> str:
    """`shards` .tar files of `per_shard` PNGs each under root/train, keys numbered across shards."""
    folder = root / "train"
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"part-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:03d}"
                for suffix, data in ((".png", _png(s * per_shard + i)), (".cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root)


def keys_read(shards: ProcessShards, epoch: int) -> list[str]:
    return [example["__key__"] for example in shards.for_epoch(epoch)]


def test_rank_shards_divide_evenly_and_rotate_the_rest():
    for num_shards, world in ((8, 4), (5, 2), (7, 3), (16, 6)):
        seen = set()
        for epoch in range(6):
            parts = [rank_shards(num_shards, world, rank, epoch, seed=0) for rank in range(world)]
            flat = [i for part in parts for i in part]
            assert len(flat) == len(set(flat)) == num_shards // world * world  # disjoint, the same number each
            assert all(len(part) == num_shards // world for part in parts)
            seen |= set(flat)
        assert seen == set(range(num_shards))  # over the epochs the left-over shards are read too


def test_each_process_reads_only_its_shards(tmp_path):
    """5 webdataset shards over 2 processes: each reads 2 per epoch (nobody reads all five, as datasets' fallback
    would, reading 1 in 2 of every shard), the fifth is another one each epoch; the log line says so."""
    root = write_webdataset(tmp_path, shards=5, per_shard=4)
    source = load_source("train", train_dir=root)
    parts = [ProcessShards(source.dataset, world=2, rank=rank, seed=0, shuffle_buffer=8) for rank in (0, 1)]
    assert "5 shards: each of the 2 process(es) reads 2 per epoch" in parts[0].describe(20)
    left_out = set()
    for epoch in range(3):
        a, b = keys_read(parts[0], epoch), keys_read(parts[1], epoch)
        assert len(a) == len(b) == 8 and not set(a) & set(b)  # balanced and disjoint
        shards = {key[:3] for key in a + b}
        assert len(shards) == 4
        left_out |= {f"{s:03d}" for s in range(5)} - shards
        assert keys_read(parts[0], epoch) == a  # an epoch replays exactly (resume)
    assert len(left_out) > 1  # the fifth shard rotates

    single = ProcessShards(source.dataset, world=1, rank=0, shuffle_buffer=8)
    assert sorted(keys_read(single, 0)) == sorted(f"{s:03d}{i:03d}" for s in range(5) for i in range(4))
    few = ProcessShards(source.dataset, world=8, rank=3)
    assert few.reads_everything and "every process reads all of them" in few.describe(20)


def test_a_local_folder_divides_among_processes_and_workers(tmp_path):
    """pretrain.py cuts a local folder into a multiple of processes x workers shards: with 3 processes of 2 workers
    (16 shards asked, 18 made) every process reads a third of the images and every worker a sixth."""
    from test_pretrain import make_image_folder

    root = make_image_folder(tmp_path / "images", per_class=12)  # 36 train images
    source = load_source("train", train_dir=str(root), num_shards=-(-16 // 6) * 6)
    assert source.dataset.num_shards == 18
    paths = []
    for rank in range(3):
        part = ProcessShards(source.dataset, world=3, rank=rank, workers=2)
        assert part.per_process == 6 and part.epoch_fraction() == 1.0
        paths.append({example["image"]["path"] for example in part.for_epoch(0)})
    assert [len(p) for p in paths] == [12, 12, 12] and len(set.union(*paths)) == 36


# ---------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------


def test_a_signal_saves_a_checkpoint_and_auto_resumes_exactly(tmp_path, monkeypatch):
    """SIGUSR1 during step 3 of 6: the step finishes, a checkpoint is saved, the run exits with status 75; a second
    signal during the save changes nothing; `auto` then ends where an uninterrupted run ends, bit for bit."""
    common = TINY + ["--max_steps", "6", "--eval_split", "none", "--num_workers", "1"]
    straight = pretrain.train(pretrain.load_config(None, common + ["--output_dir", str(tmp_path / "a")]))

    real_step, real_save = pretraining.train_step, pretraining.save_checkpoint

    def step_then_signal(run, window):
        out = real_step(run, window)
        if run.state.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    def save_signalled_again(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal in the middle of the save
        return real_save(*args, **kwargs)

    monkeypatch.setattr(pretraining, "train_step", step_then_signal)
    monkeypatch.setattr(pretraining, "save_checkpoint", save_signalled_again)
    out = str(tmp_path / "b")
    assert pretrain.main(common + ["--output_dir", out]) == PREEMPTED
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-00000003"]
    assert not os.path.exists(os.path.join(out, "final"))
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are the run's only

    monkeypatch.setattr(pretraining, "train_step", real_step)
    monkeypatch.setattr(pretraining, "save_checkpoint", real_save)
    resumed = pretrain.train(pretrain.load_config(None, common + ["--output_dir", out,
                                                                  "--resume_from_checkpoint", "auto"]))
    assert resumed.state.step == 6 and not resumed.preempted
    expected = straight.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_dataloader_workers_leave_the_signal_to_the_training_process():
    pretraining.ignore_stop_signals(0)  # what a worker runs first
    try:
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1))
    finally:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------------------
# 2 machines x 2 processes == 1 x 4 == 1 process (float64, gloo, CPU)
# ---------------------------------------------------------------------------------------------------------

DRIVER = r'''
import os, sys
sys.path.insert(0, {root!r})
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from moco_hf import MoCoConfig, MoCoModel

out, world = sys.argv[1], 4
accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
single = accelerator.num_processes == 1
torch.manual_seed(0)
config = MoCoConfig(backbone="test_resnet", embed_dim=16, queue_size=32, momentum=0.9, tau=0.2, shuffle_bn=False,
                    bn_splits=world if single else 1)  # one process: BatchNorm over the 4 chunks 4 processes see
model = MoCoModel(config).double().train()
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
model, optimizer = accelerator.prepare(model, optimizer)
rank, per = accelerator.process_index, 8 // accelerator.num_processes
for step in range(3):
    g = torch.Generator().manual_seed(step)
    x1, x2 = (torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))  # the global batch
    mine = slice(rank * per, (rank + 1) * per)
    loss = model(x1[mine], x2[mine]).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
if accelerator.is_main_process:
    state = accelerator.unwrap_model(model).state_dict()
    torch.save({{k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}},
               os.path.join(out, "state.pt"))
    with open(os.path.join(out, "launch.txt"), "w") as f:
        f.write(f"{{accelerator.num_processes}} processes, node rank {{os.environ.get('GROUP_RANK', '-')}}")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(driver, out, nodes: int, per_node: int) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    if nodes * per_node == 1:
        return [subprocess.Popen([sys.executable, str(driver), str(out)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                              "--nproc_per_node", str(per_node), "--node_rank", str(node), "--master_addr",
                              "127.0.0.1", "--master_port", str(port), str(driver), str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node in range(nodes)]


def test_two_machines_of_two_processes_train_as_one_machine_of_four_and_as_one_process(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    runs = {"2x2": (2, 2), "1x4": (1, 4), "1x1": (1, 1)}
    states = {}
    for name, (nodes, per_node) in runs.items():
        out = tmp_path / name
        out.mkdir()
        for proc in _launch(driver, out, nodes, per_node):
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        assert (out / "launch.txt").read_text().startswith(f"{nodes * per_node} processes")
        states[name] = torch.load(out / "state.pt")
    # float64 (tests/_tolerance.py): BatchNorm over 2 images of 32 x 32 per process; 3 steps of at most 30 layers,
    # forward and backward; the processes' gradients summed by gloo's all-reduce in another order than one process
    tol = tolerance(torch.float64, terms=8 * 32 * 32, depth=3 * 2 * 30, scale=10)
    for name, tensor in states["1x4"].items():
        assert torch.equal(states["2x2"][name], tensor), name  # the same ranks in the same order: the same bits
        torch.testing.assert_close(states["1x1"][name], tensor, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert int(states["1x4"]["queue_ptr"]) == 3 * 8 % 32
