"""moco_hf.views: the batches the training loop gets, and where a resumed run picks them up."""

import io

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from moco_hf.data import ThreadDecoder, collate_encoded
from moco_hf.training import TrainState
from moco_hf.views import BatchStream, GPUViews


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
    """Images 1..count; every 4th is unreadable. Decoded by the workers, an unreadable image is only a count (here
    an empty image, as at the end of a worker's stream), so the chunk holding it is short; as bytes, the decoder
    finds out."""
    samples = []
    for i in range(1, count + 1):
        if i % 4 == 0:
            samples.append((torch.tensor([0, 1, 2], dtype=torch.uint8), 0) if encoded
                           else (torch.empty(3, 0, 0, dtype=torch.uint8), 1))
        elif encoded:
            samples.append((_png(i), 0))
        else:
            samples.append((torch.full((3, 2 + i % 3, 3 + i % 4), i, dtype=torch.uint8), 0))
    return samples


def _views(samples, state, decoder, batch=8, chunk=4):
    dataset = _Samples(samples)
    loader = DataLoader(dataset, batch_size=chunk, collate_fn=collate_encoded)
    return GPUViews(BatchStream(dataset, loader, state), torch.device("cpu"), _Ids(), 0, 0, batch, decoder)


@pytest.mark.parametrize("decode", ["workers", "threads"])
def test_streamed_device_views_resume_exactly_with_carried_images(decode):
    """Short chunks (unreadable images) leave images over after a batch; they start the next one. Stopping after
    any step and resuming from the saved position gives the batches of the uninterrupted run, epochs included."""
    decoder = ThreadDecoder(2) if decode == "threads" else None
    samples = _samples(encoded=decode == "threads")
    steps = 12  # 30 samples, 22 readable: about 3 batches of 8 per epoch, so 4 epochs
    straight_views = _views(samples, TrainState(), decoder)
    straight = [straight_views.next(step)[0] for step in range(steps)]
    assert all(len(ids) == 8 for ids in straight)
    assert len(set(straight[0] + straight[1])) == 16  # no image twice within an epoch
    assert not any(i % 4 == 0 for ids in straight for i in ids)  # unreadable ones never reach a batch

    carried = 0
    for stop in range(1, steps):
        state = TrainState()
        first = _views(samples, state, decoder)
        for step in range(stop):
            first.next(step)
        position = (state.data_epoch, state.batches_in_epoch, *first.carry_position())
        carried += position[2] > 0

        resumed_state = TrainState(data_epoch=position[0], batches_in_epoch=position[1])
        resumed = _views(samples, resumed_state, decoder)
        resumed.restore_carry(*position[2:])
        assert [resumed.next(step)[0] for step in range(stop, steps)] == straight[stop:], f"resumed after {stop}"
    assert carried >= steps // 2  # the test exercises the carry
    if decoder is not None:
        decoder.close()


def test_without_the_carry_a_resume_would_lose_images():
    """The check above can fail: dropping the carry (what a resume did before) changes the next batch."""
    samples = _samples(encoded=False)
    straight = _views(samples, TrainState(), None)
    batches = [straight.next(step)[0] for step in range(3)]
    state = TrainState()
    first = _views(samples, state, None)
    first.next(0)
    assert first.carry_position()[0] > 0
    resumed = _views(samples, TrainState(data_epoch=state.data_epoch, batches_in_epoch=state.batches_in_epoch), None)
    assert resumed.next(1)[0] != batches[1]
