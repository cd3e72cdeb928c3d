"""Packs on disk: every format comes back from its stored state, a later engine reads its packs
instead of building them and computes the same, and a pack file that is unreadable or holds a
format this machine no longer picks is built again and written anew."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.artifact.serving import ServingStore, write_serving_store
from quept_core.quant.grid import quantize
from quept_core.runtime import engine as engine_module
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.kernels.formats import FORMATS, DenseWeight, PackedWeight
from quept_core.runtime.packfiles import PackFiles, width_file
from quept_core.runtime.weights import ElasticWeights

TOKENS = torch.tensor([[5, 9, 17, 3, 44, 12, 200, 31, 7, 8, 100, 101]])
PRECISIONS = ("w3", "w4", "w8", "fp")


@pytest.mark.parametrize("fmt", [*FORMATS, DenseWeight])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_every_format_comes_back_from_its_stored_state(fmt, bits):
    group = -1 if bits == 8 else 64
    qw = quantize(torch.randn(128, 128, generator=torch.Generator().manual_seed(bits)), bits, group)
    if fmt is not DenseWeight and not fmt.supports(qw, qw.codes.device):
        pytest.skip(f"{fmt.__name__} does not hold {bits}-bit weights with group {group}")
    pack = fmt(qw.dequantize(), torch.bfloat16) if fmt is DenseWeight else fmt(qw, torch.bfloat16)
    pack.prefill_dense = False
    attrs, tensors = pack.state()
    restored = fmt.restore(json.loads(json.dumps(attrs)), {key: t.clone() for key, t in tensors.items()})
    x = torch.randn(3, 128).to(torch.bfloat16)
    assert torch.equal(restored.linear(x), pack.linear(x))
    assert torch.equal(restored.dense(), pack.dense())
    assert restored.nbytes == pack.nbytes and restored.prefill_dense is False


@pytest.fixture
def store(tmp_path) -> ServingStore:
    loaded = tiny_loaded()
    return write_serving_store(tmp_path / "tiny", ElasticWeights(loaded, tiny_elastic(loaded)), loaded.tokenizer,
                               artifact_id="a" * 16, model_name="tiny", model_checksum="0" * 64, progress=False)


def engine_over(store: ServingStore) -> QueptEngine:
    return QueptEngine(store, store.tokenizer(), model_name="tiny", device="cpu", pack_dir=store.folder)


def first_engine(store: ServingStore) -> tuple[QueptEngine, dict[str, torch.Tensor]]:
    """An engine that builds every plan of PRECISIONS, stores its packs, and their logits."""
    engine = engine_over(store)
    logits = {p: engine.logits(TOKENS, engine.plan(p)) for p in PRECISIONS}
    engine.store_packs()
    return engine, logits


def no_packing(monkeypatch) -> None:
    def refuse(*_):
        raise AssertionError("packed from the codes instead of read from the pack files")

    monkeypatch.setattr(engine_module, "pack_weight", refuse)


def pack_folder(engine: QueptEngine) -> Path:
    return engine.pack_files.folder


def test_a_later_engine_reads_its_packs_and_computes_the_same(store, monkeypatch):
    first, logits = first_engine(store)
    assert sorted(p.name for p in pack_folder(first).iterdir()) == sorted(
        width_file(b) for b in (3, 4, 8, None))  # w5..w7 were never resident: not written
    no_packing(monkeypatch)
    later = engine_over(store)
    fp = later.plan("fp")
    assert later.stored_weight_bytes(fp) == first.weight_bytes(fp)
    resident = later.cache.keys()
    assert all(bits is not None for _, bits in resident)  # sizing fp read none of its packs
    for precision in PRECISIONS:
        assert torch.equal(later.logits(TOKENS, later.plan(precision)), logits[precision]), precision
    assert str(pack_folder(later)) not in Path("/proc/self/maps").read_text()  # no map outlives the reads


def test_every_file_of_the_store_and_its_packs_is_readable_by_other_users(store):
    """The cache may be written by one user (a calibration job, an image build) and served by another."""
    first_engine(store)
    files = list(store.folder.rglob("*.safetensors"))
    assert any(pack_folder(engine_over(store)) in f.parents for f in files)
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in files), [oct(f.stat().st_mode) for f in files]


def test_an_unreadable_pack_file_is_built_again_and_written_anew(store, caplog):
    _, logits = first_engine(store)
    later = engine_over(store)
    w4 = pack_folder(later) / width_file(4)
    w4.write_bytes(w4.read_bytes()[: w4.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert torch.equal(later.logits(TOKENS, later.plan("w4")), logits["w4"])
    assert "unreadable" in caplog.text
    later.store_packs()
    w4_names = [name for name, bits in later.pack_keys(later.plan("w4")) if bits == 4]
    assert PackFiles(store.folder, torch.device("cpu")).holds(4, w4_names)


def test_a_pack_in_a_format_no_longer_chosen_is_built_again_and_its_file_rewritten(store, monkeypatch):
    _, logits = first_engine(store)
    later = engine_over(store)
    monkeypatch.setattr(engine_module, "chosen", lambda *_: None)  # as after the choices file was deleted
    written = []
    monkeypatch.setattr(later.pack_files, "write", lambda bits, packs: written.append((bits, packs)))
    assert torch.equal(later.logits(TOKENS, later.plan("w3")), logits["w3"])
    later.store_packs()
    assert [bits for bits, _ in written] == [3]
    assert all(isinstance(pack, PackedWeight) for pack in written[0][1].values())


def test_a_cache_that_cannot_be_written_costs_later_starts_time_not_this_one_its_start(store, monkeypatch, caplog):
    def full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("quept_core.runtime.packfiles.save_tensors_atomic", full)
    with caplog.at_level(logging.WARNING):
        engine, logits = first_engine(store)
    assert "not stored" in caplog.text and not list(pack_folder(engine).glob("*.safetensors"))
    assert torch.equal(engine.logits(TOKENS, engine.plan("w4")), logits["w4"])
