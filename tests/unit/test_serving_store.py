"""The serving store on a tiny random model: it holds every (linear, bits) of the calibrated elastic
linears bit-exactly, an engine over it computes what an engine over the elastic linears does, and a
store that is partly written, of another format or of another artifact is rebuilt, never loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_elastic, tiny_loaded

from quept_core.artifact import serving
from quept_core.artifact.serving import (
    DENSE,
    MANIFEST,
    ServingStore,
    StoreError,
    codes_file,
    open_serving_store,
    write_serving_store,
)
from quept_core.layers import HEAD, linear_names
from quept_core.runtime.engine import QueptEngine
from quept_core.runtime.model import CONFIG_KEYS
from quept_core.runtime.weights import EMBEDDING, HEAD_GROUP_SIZE, ElasticWeights, norm_names

TOKENS = torch.tensor([[5, 9, 17, 3, 44, 12, 200, 31, 7, 8, 100, 101]])


def elastic_weights(**overrides) -> tuple[ElasticWeights, object]:
    loaded = tiny_loaded(**overrides)
    return ElasticWeights(loaded, tiny_elastic(loaded)), loaded.tokenizer


def write(folder, weights, tokenizer, artifact_id: str = "a" * 16) -> ServingStore:
    return write_serving_store(folder, weights, tokenizer, artifact_id=artifact_id, model_name="tiny",
                               model_checksum="0" * 64, progress=False)


@pytest.fixture(scope="module")
def elastic():
    return elastic_weights()


@pytest.fixture(scope="module")
def store(elastic, tmp_path_factory) -> ServingStore:
    return write(tmp_path_factory.mktemp("store") / "tiny", *elastic)


def test_every_linear_and_the_head_round_trip_bit_exactly_at_every_bits(elastic, store):
    weights, _ = elastic
    names = [*linear_names(weights.config.num_hidden_layers), HEAD]
    for bits in weights.bit_config.bits:
        for name in names:
            want, got = weights.quantized(name, bits), store.quantized(name, bits)
            assert (got.bits, got.group_size) == (want.bits, want.group_size)
            for field in ("codes", "scale", "zero"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (name, bits, field)
            assert got.codes.dtype == torch.uint8


def test_the_head_keeps_its_own_groups_at_every_width(elastic, store):
    """8 bits included, where the linears have one group per row: the head's grid is not the bit config's."""
    weights, _ = elastic
    hidden = weights.config.hidden_size
    for bits in weights.bit_config.bits:
        head = store.quantized(HEAD, bits)
        assert head.group_size == HEAD_GROUP_SIZE
        assert head.scale.shape == (weights.config.vocab_size, -(-hidden // HEAD_GROUP_SIZE))
    assert weights.bit_config.group_size_for(8) == -1


def test_dense_weights_norms_config_and_tokenizer_come_back(elastic, store):
    weights, tokenizer = elastic
    for name in [*linear_names(weights.config.num_hidden_layers), HEAD, EMBEDDING]:
        assert torch.equal(store.dense(name), weights.dense(name).to(torch.bfloat16)), name
    for name in norm_names(weights.config.num_hidden_layers):
        assert torch.equal(store.norm(name), weights.norm(name)), name
    assert store.tied and store.bit_config == weights.bit_config
    for key in CONFIG_KEYS:
        assert getattr(store.config, key) == getattr(weights.config, key), key
    saved = store.tokenizer()
    assert saved.backend_tokenizer.get_vocab() == tokenizer.get_vocab() and saved.eos_token_id == tokenizer.eos_token_id


def test_what_was_read_keeps_no_memory_map_of_the_store(store):
    weights = [store.dense(HEAD), store.quantized(HEAD, 4).codes]
    with store.kept_open():
        weights += [store.dense(HEAD), store.quantized(HEAD, 8).codes]
        assert str(store.folder) in Path("/proc/self/maps").read_text()
    assert str(store.folder) not in Path("/proc/self/maps").read_text()
    assert all(w.abs().sum() > 0 for w in weights)
    assert torch.equal(weights[0], weights[2])


def test_bad_names_and_bits_are_clear_errors(store):
    with pytest.raises(ValueError, match="bits 2 is not in the store's bit set"):
        store.quantized(HEAD, 2)
    with pytest.raises(KeyError, match="no weight model.layers.9.mlp.up_proj.codes"):
        store.quantized("model.layers.9.mlp.up_proj", 4)


@pytest.mark.parametrize("tied", [True, False])
def test_an_engine_over_the_store_computes_what_one_over_the_elastic_linears_does(tmp_path, tied):
    weights, tokenizer = elastic_weights(tie_word_embeddings=tied)
    store = write(tmp_path / "tiny", weights, tokenizer)
    assert store.tied is tied
    reference = QueptEngine(weights, tokenizer, device="cpu")
    engine = QueptEngine(store, store.tokenizer(), model_name=store.model_name, device="cpu")
    for precision in ("w3", "w4", "w5", "w8"):
        assert torch.equal(engine.logits(TOKENS, engine.plan(precision)),
                           reference.logits(TOKENS, reference.plan(precision))), precision
    # fp runs the bf16 copy of the masters: within bf16 rounding of the float32 ones.
    torch.testing.assert_close(engine.logits(TOKENS, engine.plan("fp")), reference.logits(TOKENS, reference.plan("fp")),
                               rtol=0, atol=5e-2)


def test_a_partly_written_store_is_rebuilt_not_loaded(tmp_path, elastic):
    folder = tmp_path / "tiny"
    write(folder, *elastic)
    w4 = folder / codes_file(4)
    size = w4.stat().st_size
    with w4.open("r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(StoreError, match="not the size"):
        ServingStore(folder)
    assert open_serving_store(folder, "a" * 16) is None
    rebuilt = write(folder, *elastic)
    assert w4.stat().st_size == size
    assert torch.equal(rebuilt.quantized(HEAD, 4).codes, elastic[0].quantized(HEAD, 4).codes)


def test_a_write_that_fails_midway_leaves_nothing_to_load(tmp_path, elastic, monkeypatch):
    folder = tmp_path / "tiny"
    saved = []

    def fail_after_dense(path, tensors):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        torch.save(tensors, path)

    monkeypatch.setattr(serving, "save_tensors_atomic", fail_after_dense)
    with pytest.raises(OSError, match="disk full"):
        write(folder, *elastic)
    assert saved and saved[0].name == DENSE
    assert not folder.exists() and list(tmp_path.iterdir()) == [tmp_path / ".tiny.lock"]


def test_another_format_or_artifact_rebuilds_the_store(tmp_path, elastic, monkeypatch):
    folder = tmp_path / "tiny"
    write(folder, *elastic)
    built = (folder / MANIFEST).stat().st_mtime_ns
    assert write(folder, *elastic).manifest["artifact_id"] == "a" * 16
    assert (folder / MANIFEST).stat().st_mtime_ns == built  # complete and current: reused
    assert open_serving_store(folder, "b" * 16) is None
    assert write(folder, *elastic, artifact_id="b" * 16).artifact_id == "b" * 16
    monkeypatch.setattr(serving, "FORMAT_VERSION", serving.FORMAT_VERSION + 1)
    with pytest.raises(StoreError, match="format"):
        ServingStore(folder)
    assert write(folder, *elastic, artifact_id="b" * 16).manifest["format_version"] == serving.FORMAT_VERSION
