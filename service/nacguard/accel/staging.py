"""Pinned host staging: a CPU batch is copied into a reused page-locked buffer (the padding is
written there too), then sent with ``non_blocking=True``: one DMA copy that does not stall the
host, instead of a pageable copy that does."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["HostStager"]


class HostStager:
    """Moves batches onto the device, padded to a row count, through reused pinned buffers.

    On a CUDA device a CPU batch is copied into a page-locked buffer (sized for the largest
    batch seen, rows beyond the batch zeroed) and sent with ``non_blocking=True``; a CUDA event
    recorded after the copy is waited on before the buffer is written again. Elsewhere the batch
    is padded where it is and moved normally; an unpadded CPU batch for a CPU device is returned
    as is (no copy).

    Not thread-safe: one stager per device runner.

    Args:
        device: the target device.
        pin: use pinned buffers; default: when the device is CUDA.
    """

    def __init__(self, device: torch.device | str, *, pin: bool | None = None) -> None:
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._events: dict[tuple[Any, ...], Any] = {}

    def __call__(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``x`` on the device with ``rows`` rows (zero rows appended; default ``len(x)``)."""
        n = int(x.shape[0])
        rows = n if rows is None else rows
        if rows < n:
            raise ValueError(f"cannot stage {n} rows into {rows}")
        if not self.pin or x.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
            if rows == n:
                return x
            out = x.new_zeros((rows, *x.shape[1:]))
            out[:n].copy_(x)
            return out
        key = (tuple(x.shape[1:]), x.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            self._wait(key)
            buf = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, pin_memory=True)
            self._buffers[key] = buf
        else:
            self._wait(key)  # the last copy out of this buffer must be done before we write it
        view = buf[:rows]
        view[:n].copy_(x)
        if rows > n:
            view[n:].zero_()
        out = view.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._events[key] = event
        return out

    def _wait(self, key: tuple[Any, ...]) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.synchronize()
