"""Quant tests run single-threaded: their tensors are small, so intra-op threads add only
synchronisation, and on a shared 2-core machine a descheduled worker thread stalls every op
(measured here: 60 AdamW8bit steps 0.7 s with 1 thread vs 10 s with 2 under load)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
