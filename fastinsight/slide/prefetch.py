"""Overlap reading, host-to-device copy and compute: a reusable iterator of device batches.

The slide pipeline is ``read -> decode -> resample`` (tiler threads, CPU) ``-> host-to-device
copy -> encoder -> head`` (GPU). :class:`DevicePrefetcher` wraps any iterable of
:class:`~fastinsight.slide.tiler.TileBatch` and yields :class:`DeviceBatch` objects whose
``images`` already sit on the device, so that on a GPU the encoder never waits for a copy:

- a ring of ``depth + 1`` staging buffers in *pinned* host memory (page-locked, so the copy is
  a true asynchronous DMA), allocated once and reused -- pinning a fresh buffer per batch costs
  more than the copy itself;
- each batch is copied from its staging buffer on a *side* CUDA stream
  (``torch.cuda.Stream``), and an event recorded after the copy; while the consumer runs the
  encoder on batch ``k`` on the compute stream, batch ``k + 1`` is already being copied
  (double buffering with ``depth = 1``; ``depth`` batches in flight in general);
- before the consumer gets batch ``k`` the compute stream waits on its event (a GPU-side wait:
  the CPU does not block), and the device tensor is tied to the compute stream with
  ``record_stream`` so the caching allocator does not hand its memory to a later copy too
  early; a staging buffer is reused only after the event of its previous copy has completed.

On a CPU device the same code runs with plain (unpinned) staging buffers, no streams and no
events; the "copy" is a real copy, so the ring logic is exercised by the CPU tests.

Per batch, :class:`DeviceBatch` records ``read_wait_s`` (the consumer waited for the tiler),
``stage_s`` (host copy into the staging buffer, incl. waiting for a free one) and, with
``timing=True`` on CUDA, ``copy_ms`` (the device time of the transfer, from CUDA events).
A consumer whose ``read_wait_s`` and ``stage_s`` are near zero never waits: the GPU is the
bottleneck, which is the goal.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastinsight.errors import InputError
from fastinsight.slide.grid import Tile


@dataclass(frozen=True, eq=False)
class DeviceBatch:
    """One batch of tiles on the device.

    ``images``: ``uint8 [B, tile_px, tile_px, 3]`` torch tensor on the prefetcher's device,
    ready for use on the current stream. ``index``: the batch's position in the source.
    Shapes: ``images`` ``[B, H, W, 3]``.
    """

    images: Any
    tiles: tuple[Tile, ...]
    index: int
    read_wait_s: float
    stage_s: float
    copy_ms: float | None = None

    def __len__(self) -> int:
        return len(self.tiles)


class DevicePrefetcher:
    """Yields the batches of ``source`` (an iterable of ``TileBatch``) as :class:`DeviceBatch`
    on ``device``, keeping ``depth`` host-to-device copies in flight ahead of the consumer.

    Iterate once per prefetcher (each iteration re-iterates ``source``).
    """

    def __init__(
        self,
        source: Iterable[Any],
        device: Any,
        *,
        depth: int = 1,
        timing: bool = False,
    ) -> None:
        import torch

        if depth < 1:
            raise InputError(f"prefetch depth must be >= 1; got {depth}")
        self.source = source
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("device cuda was asked for but no CUDA GPU is visible; use cpu")
        self.depth = int(depth)
        self.timing = bool(timing) and self.device.type == "cuda"
        self._ring: list[Any] = []
        self._ring_events: list[Any] = []

    # ------------------------------------------------------------------------------ staging
    def _staging(self, slot: int, shape: tuple[int, ...]) -> Any:
        """The pinned (CUDA) or plain (CPU) staging buffer of ``slot``, at least ``shape``."""
        import torch

        while len(self._ring) <= slot:
            self._ring.append(None)
            self._ring_events.append(None)
        buf = self._ring[slot]
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            pin = self.device.type == "cuda"
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
            self._ring[slot] = buf
        return buf[: shape[0]]

    def __iter__(self) -> Iterator[DeviceBatch]:
        import torch

        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(device=self.device) if cuda else None
        n_slots = self.depth + 1
        in_flight: collections.deque[tuple[Any, ...]] = collections.deque()
        slot = 0
        it = iter(self.source)
        exhausted = False

        def launch() -> bool:
            nonlocal slot, exhausted
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                exhausted = True
                return False
            read_wait = getattr(batch, "wait_seconds", time.perf_counter() - start)
            t0 = time.perf_counter()
            host = batch.images
            host_t = host if isinstance(host, torch.Tensor) else torch.from_numpy(np.asarray(host))
            event = self._ring_events[slot] if slot < len(self._ring_events) else None
            if event is not None:
                event.synchronize()  # the previous copy out of this buffer has finished
            staging = self._staging(slot, tuple(host_t.shape))
            staging.copy_(host_t)
            stage_s = time.perf_counter() - t0
            timer = None
            if cuda:
                assert copy_stream is not None
                # No wait on the compute stream here: that would queue this copy behind the
                # encoder of the batch before and undo the overlap. Memory safety comes from
                # record_stream on the consumer side.
                with torch.cuda.stream(copy_stream):
                    if self.timing:
                        timer = (
                            torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True),
                        )
                        timer[0].record(copy_stream)
                    dev = staging.to(self.device, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy_stream)
                    if timer is not None:
                        timer[1].record(copy_stream)
                self._ring_events[slot] = done
            else:
                dev = staging.clone()
                done = None
            in_flight.append(
                (
                    dev,
                    done,
                    tuple(batch.tiles),
                    int(getattr(batch, "index", 0)),
                    read_wait,
                    stage_s,
                    timer,
                )
            )
            slot = (slot + 1) % n_slots
            return True

        try:
            while len(in_flight) < self.depth + 1 and launch():
                pass
            while in_flight:
                dev, done, tiles, index, read_wait, stage_s, timer = in_flight.popleft()
                if cuda:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(done)  # GPU-side wait; the CPU runs on
                    dev.record_stream(current)
                copy_ms = None
                if timer is not None:
                    timer[1].synchronize()
                    copy_ms = float(timer[0].elapsed_time(timer[1]))
                yield DeviceBatch(dev, tiles, index, read_wait, stage_s, copy_ms)
                if not exhausted:
                    launch()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stop the tiler's threads when the consumer stops early
