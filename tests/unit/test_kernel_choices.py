"""Kernel choices are measured once per machine and read back from disk at later starts."""

import pytest
import torch

from quept_core.quant.grid import quantize
from quept_core.runtime.kernels import formats
from quept_core.runtime.kernels.choices import Choice, ChoiceBook, choices_path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    formats.planes_gemv()  # the kernels build (or not) in the real cache, once per process
    monkeypatch.setenv("QUEPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(formats, "_BOOKS", {})
    return tmp_path


def _weight(bits: int = 4):
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    return quantize(weight, bits, 64)


def test_a_choice_is_measured_once_then_read_from_disk(fresh_cache, monkeypatch):
    qw = _weight()
    first = formats.pack_weight(qw, torch.bfloat16)
    assert choices_path(qw.codes.device).is_file()

    monkeypatch.setattr(formats, "_BOOKS", {})  # a new process: nothing in memory

    def no_timing(*args, **kwargs):
        raise AssertionError("a stored choice must not be timed again")

    monkeypatch.setattr(formats, "_seconds", no_timing)
    again = formats.pack_weight(qw, torch.bfloat16)
    assert type(again) is type(first) and again.prefill_dense == first.prefill_dense
    x = torch.randn(2, 128).to(torch.bfloat16)
    assert torch.equal(again.linear(x), first.linear(x))


def test_a_stored_format_that_cannot_run_here_is_measured_again(fresh_cache, monkeypatch):
    qw = _weight()
    shape = (qw.bits, qw.group_size, *qw.codes.shape, torch.bfloat16)
    ChoiceBook(qw.codes.device).put(Choice("NoSuchFormat", False), *shape)
    pack = formats.pack_weight(qw, torch.bfloat16)
    assert type(pack).__name__ != "NoSuchFormat"
    assert ChoiceBook(qw.codes.device).get(*shape).format == type(pack).__name__


def test_an_unreadable_file_is_measured_again(fresh_cache):
    path = choices_path(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text("{ half written")
    book = ChoiceBook(torch.device("cpu"))
    assert book.entries() == {}
    book.put(Choice("BitPlanes", True), 4, 64, 8, 128, torch.bfloat16)
    assert ChoiceBook(torch.device("cpu")).get(4, 64, 8, 128, torch.bfloat16) == Choice("BitPlanes", True)
