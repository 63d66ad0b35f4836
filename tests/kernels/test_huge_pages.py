"""Host tensors carved out of huge-page mappings: values, alignment, lifetime, the switch that turns it off."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from clex_serve.kernels import huge_pages
from clex_serve.kernels.huge_pages import ALIGNMENT, HUGE_PAGE, HugePageArena

needs_madvise = pytest.mark.skipif(not huge_pages.huge_pages_supported(), reason="no MADV_HUGEPAGE here")


def vm_flags_of(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` (Linux's /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError("address not mapped")


@needs_madvise
def test_carved_tensors_keep_their_values_apart_and_aligned():
    arena = HugePageArena(chunk_bytes=4 << 20)
    sources = [torch.randn(shape) for shape in ((100, 64), (3, 7), (512, 512), (1,))]
    copies = [arena.copy(source) for source in sources]
    assert copies[0].data_ptr() % HUGE_PAGE == 0  # a chunk starts on a huge page
    for source, copy in zip(sources, copies):
        assert copy.data_ptr() % ALIGNMENT == 0 and copy.is_contiguous()
        assert torch.equal(source, copy)
    spans = sorted((copy.data_ptr(), copy.data_ptr() + copy.nbytes) for copy in copies)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    bf16 = arena.copy(torch.randn(64, 33).to(torch.bfloat16))
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (64, 33)


@needs_madvise
def test_mappings_are_advised_to_huge_pages_and_outlive_the_arena():
    arena = HugePageArena(chunk_bytes=4 << 20)
    small = arena.copy(torch.arange(1000, dtype=torch.float32))
    large = arena.empty((3 << 20,), torch.float32)  # 12 MB: past the chunk, a mapping of its own
    assert large.data_ptr() % HUGE_PAGE == 0
    if sys.platform == "linux":
        assert "hg" in vm_flags_of(small.data_ptr()) and "hg" in vm_flags_of(large.data_ptr())
    del arena
    gc.collect()
    large.fill_(2.0)
    assert small.sum().item() == sum(range(1000)) and large[-1].item() == 2.0


def test_turned_off_the_arena_hands_out_plain_tensors(monkeypatch):
    monkeypatch.setenv(huge_pages.DISABLE_VARIABLE, "0")
    arena = HugePageArena()
    assert not arena.enabled
    source = torch.randn(8, 8)
    copy = arena.copy(source)
    assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    assert arena.empty((0, 4), torch.float32).shape == (0, 4)
