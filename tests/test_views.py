"""moco_hf.views: the batches the training loop gets, and where a resumed run picks them up."""

import io

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from moco_hf.data.decode import ThreadDecoder

from moco_hf.data.streams import collate_encoded, collate_two_views
from moco_hf.training import TrainState
from moco_hf.views import BatchStream, CPUViews, GPUViews


class _Samples(IterableDataset):
    """(image, unreadable before it) samples as the training streams yield them, rotated by one each epoch."""

    def __init__(self, samples):
        self.samples, self.epoch = samples, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        shift = self.epoch % len(self.samples)
        return iter(self.samples[shift:] + self.samples[:shift])


class _Ids:
    """Stands in for MoCoGPUAugment: which images a batch holds (image i is filled with the value i)."""

    def two_views(self, images, generator=None):
        ids = images.pixels[0, images.offsets].tolist()
        return ids, ids


def _png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (3 + value % 4, 2 + value % 3), (value, value, value)).save(buffer, format="PNG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _samples(encoded: bool, count=30):
    """Images 1..count; every 4th is unreadable. Decoded by the workers, an unreadable image is only a name (here
    with an empty image, as at the end of a worker's stream), so the chunk holding it is short; as bytes, the decoder
    finds out. Samples are (image, names skipped before it, its own name), as `EncodedStream` yields them."""
    samples = []
    for i in range(1, count + 1):
        if i % 4 == 0:
            samples.append((torch.tensor([0, 1, 2], dtype=torch.uint8), [], f"{i}.png") if encoded
                           else (torch.empty(3, 0, 0, dtype=torch.uint8), [f"{i}.png"], None))
        elif encoded:
            samples.append((_png(i), [], f"{i}.png"))
        else:
            samples.append((torch.full((3, 2 + i % 3, 3 + i % 4), i, dtype=torch.uint8), [], None))
    return samples


def _cpu_samples(count=30):
    """(view_q, view_k, names of the unreadable images before it) as the CPU workers' stream yields them: images
    1..count filled with their number, every 4th unreadable (only named, with the next readable image)."""
    samples, skipped = [], []
    for i in range(1, count + 1):
        if i % 4 == 0:
            skipped.append(f"{i}.png")
            continue
        view = torch.full((3, 2, 2), float(i))
        samples.append((view, -view, skipped))
        skipped = []
    return samples


class _CPUIds(CPUViews):
    """CPUViews whose batches are the numbers of the images they hold (and a check that both views match)."""

    def next(self, step):
        view_q, view_k, skipped = super().next(step)
        assert torch.equal(view_k, -view_q)
        ids = view_q[:, 0, 0, 0].long().tolist()
        return ids, ids, skipped


def _views(kind, state, decoder=None, batch=8, chunk=4):
    if kind == "cpu":  # the loader keeps each epoch's last, partial chunk, as pretrain.py's does
        dataset = _Samples(_cpu_samples())
        loader = DataLoader(dataset, batch_size=chunk, collate_fn=collate_two_views, drop_last=False)
        return _CPUIds(BatchStream(dataset, loader, state), torch.device("cpu"), False, batch)
    dataset = _Samples(_samples(encoded=kind == "threads"))
    loader = DataLoader(dataset, batch_size=chunk, collate_fn=collate_encoded)
    return GPUViews(BatchStream(dataset, loader, state), torch.device("cpu"), _Ids(), 0, 0, batch, decoder)


@pytest.mark.parametrize("kind", ["workers", "threads", "cpu"])
def test_streamed_views_resume_exactly_with_carried_images(kind):
    """Short chunks (unreadable images, an epoch's last chunk) leave images over after a batch; they start the next
    one. Stopping after any step and resuming from the saved position gives the batches of the uninterrupted run,
    epochs included. Device views decoded by the workers or by threads, and the CPU workers' views."""
    decoder = ThreadDecoder(2) if kind == "threads" else None
    steps = 12  # 30 samples, 23 readable: about 3 batches of 8 per epoch, so 4 epochs
    straight_views = _views(kind, TrainState(), decoder)
    straight = [straight_views.next(step)[0] for step in range(steps)]
    assert all(len(ids) == 8 for ids in straight)
    assert len(set(straight[0] + straight[1])) == 16  # no image twice within an epoch
    assert not any(i % 4 == 0 for ids in straight for i in ids)  # unreadable ones never reach a batch

    carried = 0
    for stop in range(1, steps):
        state = TrainState()
        first = _views(kind, state, decoder)
        for step in range(stop):
            first.next(step)
        position = (state.data_epoch, state.batches_in_epoch, *first.carry_position())
        carried += position[2] > 0

        resumed_state = TrainState(data_epoch=position[0], batches_in_epoch=position[1])
        resumed = _views(kind, resumed_state, decoder)
        resumed.restore_carry(*position[2:])
        assert [resumed.next(step)[0] for step in range(stop, steps)] == straight[stop:], f"resumed after {stop}"
    assert carried >= steps // 2  # the test exercises the carry
    if decoder is not None:
        decoder.close()


@pytest.mark.parametrize("kind", ["workers", "cpu"])
def test_without_the_carry_a_resume_would_lose_images(kind):
    """The check above can fail: dropping the carry (what a resume did before) changes the next batch."""
    straight = _views(kind, TrainState())
    batches = [straight.next(step)[0] for step in range(6)]
    state = TrainState()
    first = _views(kind, state)
    stop = next(step + 1 for step in range(5) if first.next(step) and first.carry_position()[0] > 0)
    resumed = _views(kind, TrainState(data_epoch=state.data_epoch, batches_in_epoch=state.batches_in_epoch))
    assert resumed.next(stop)[0] != batches[stop]


def test_every_readable_image_of_an_epoch_reaches_a_batch():
    """23 readable images an epoch in chunks of 4 (the last one short) and batches of 8: over 23 steps (8 epochs of
    data), each image is in exactly 8 batches, although no epoch fills whole batches."""
    views = _views("cpu", TrainState())
    ids = [i for step in range(23) for i in views.next(step)[0]]
    assert sorted(set(ids)) == [i for i in range(1, 31) if i % 4] and all(ids.count(i) == 8 for i in set(ids))
