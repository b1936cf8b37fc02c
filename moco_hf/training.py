"""Pieces of the pretraining loop (`moco_hf.pretraining`): lr and momentum schedules, the optimiser, loop state,
profiler, CUDA-graph modes, the scheduler's stop signals."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import typing
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


def uses_cuda_graphs(compile_mode: str, device: torch.device) -> bool:
    """Whether encoders compiled in `compile_mode` replay CUDA graphs on `device` (torch.compile's modes that do)."""
    return device.type == "cuda" and compile_mode in ("reduce-overhead", "max-autotune")


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step
# ---------------------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, steps_per_epoch: int, base_lr: float, schedule: str = "cosine",
          warmup_steps: int = 0, milestones_epochs: typing.Sequence[int] = ()) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: lr * 0.5 * (1 + cos(pi * progress)) per step (MoCo v2), after a linear warm-up;
    step: lr * 0.1 ** (number of milestone epochs passed) (MoCo v1: epochs 120 and 160 of 200).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / max(1, steps_per_epoch)
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones_epochs)


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """The key encoder's momentum m for optimizer step `step` (0-based), applied in that step's momentum update.

    constant: `base` throughout (MoCo v1, v2). cosine: MoCo v3's rise from `base` to 1 on a half-cycle cosine (as
    BYOL), 1 - (1 - base) * (1 + cos(pi * step / total_steps)) / 2: m(0) = base, 1 at the end of training.
    """
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"momentum_schedule must be constant or cosine, got {schedule!r}")
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


OPTIMIZERS = ("sgd", "adamw", "lars")


def create_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                     momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimiser of a run, over the parameters that require gradients.

    sgd: `torch.optim.SGD` over every trainable parameter with the same weight decay, as the official MoCo v1/v2
    code. adamw (MoCo v3's ViTs) and lars (its ResNet-50s): timm's factory (`timm.optim.create_optimizer_v2`:
    `torch.optim.AdamW`, timm's `Lars` with trust coefficient 0.001) with timm's parameter groups: biases, norm
    weights (every parameter of at most one dimension) and the names in `model.no_weight_decay()` (a ViT's class
    token) get no weight decay, and timm's `Lars` leaves the groups without weight decay out of its layer-wise
    adaptation as well (it adapts only where `weight_decay != 0`).
    """
    if name == "sgd":
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    import timm.optim

    kwargs = {"momentum": momentum} if name == "lars" else {}
    return timm.optim.create_optimizer_v2(model, name, lr=lr, weight_decay=weight_decay, filter_bias_and_bn=True,
                                          **kwargs)


@dataclass
class TrainState:
    """Loop position, saved with every checkpoint (accelerate's register_for_checkpointing)."""

    step: int = 0
    data_epoch: int = 0  # epoch of this process's data stream
    batches_in_epoch: int = 0  # loader chunks (device cache: batches) already taken from it
    skipped_images: int = 0  # corrupt images skipped so far (all processes), each counted once
    skipped_names: list = field(default_factory=list)  # their names (path, or sha1: of the bytes), sorted
    # Per process, at save time: data_epoch, batches_in_epoch, images per counted item, then the images carried
    # into the next batch and the position (epoch, chunks) where the chunks they came from began
    # (`carry_position` of the streamed views).
    positions: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class StepProfiler:
    """`profile_steps` > 0: torch.profiler over that many steps after the first log window (compilation and
    warm-up done), on the main process. Writes output_dir/profile/: the ops by device time and by host time
    (`ops_by_device_time.txt`, `ops_by_host_time.txt`) and a Chrome trace (`trace.json`, for Perfetto)."""

    def __init__(self, cfg, step: int, accelerator):
        self.first = step + cfg.log_steps
        self.last = self.first + cfg.profile_steps
        self.folder = os.path.join(cfg.output_dir, "profile")
        self.enabled = accelerator.is_main_process
        self.device_type = accelerator.device.type
        self.profile = None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.first and self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()

    def after_step(self, step: int) -> None:
        if self.profile is None or step != self.last:
            return
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        self.profile.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        averages = self.profile.key_averages()
        device_sort = "self_cuda_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
        header = f"{self.last - self.first} steps from step {self.first}\n"
        for name, sort in (("ops_by_device_time.txt", device_sort), ("ops_by_host_time.txt", "self_cpu_time_total")):
            with open(os.path.join(self.folder, name), "w") as f:
                f.write(header + averages.table(sort_by=sort, row_limit=40, max_name_column_width=60))
        self.profile.export_chrome_trace(os.path.join(self.folder, "trace.json"))
        self.profile = None
        logger.info("profile of steps %d-%d written to %s", self.first + 1, self.last, self.folder)

    def close(self, step: int) -> None:
        """Training ended inside the profiled steps: write what there is."""
        if self.profile is not None:
            self.last = step
            self.after_step(step)


# ---------------------------------------------------------------------------------------------------------
# Preemption: schedulers signal before they kill a job
# ---------------------------------------------------------------------------------------------------------

# The exit status of a run that stopped on a scheduler's signal with its state saved: "temporary failure, try again"
# (EX_TEMPFAIL of sysexits.h). A job script requeues the job on it (README, "Clusters").
PREEMPTED = 75


class StopSignals:
    """SIGTERM and SIGUSR1, what schedulers send before they kill a job (SLURM: at the end of the time limit, or
    `--signal=USR1@120` minutes ahead), ask the loop to stop after the current step. The handler only records the
    first one: a second signal while the checkpoint is being written changes nothing, and the save completes (a kill
    that cannot be caught leaves at most a temporary folder, which resuming ignores).

    `requested()` is True on every process as soon as any process received one (a max all-reduce of one number per
    step when several processes run), so they all stop after the same step."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def requested(self, device: torch.device | None = None) -> bool:
        local = self.received is not None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.received is None:
            self.received = "a signal to another process"
        return flag.item() > 0
