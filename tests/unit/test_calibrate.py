"""Calibration on a tiny random LLaMA: block inputs, switching, improvement, resume, config errors."""

import pytest
import torch

from quept_core.calibration.checkpoint import CalibrationCheckpoint
from quept_core.calibration.clip_search import NO_SHRINK_LOGIT
from quept_core.calibration.loop import CalibrationConfig, block_inputs, calibrate, summary_lines
from quept_core.quant.elastic import set_bits, trainable_state
from tests.unit.tiny_llama import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = {"n_samples": 4, "seqlen": 32, "batch_size": 2, "clip_search_grid": 4, "clip_search_samples": 2,
         "end_to_end_steps": 4}


def _tokens(n: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_captured_block_inputs_reproduce_the_model():
    model = tiny_loaded().model
    tokens = _tokens(3)
    hidden, block_kwargs = block_inputs(model, tokens)
    assert hidden.shape == (3, 32, 128)
    assert block_kwargs["position_embeddings"] is not None
    with torch.no_grad():
        for layer in model.model.layers:
            hidden = layer(hidden, **block_kwargs)
        logits = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(logits, model(tokens).logits)


def test_switching_bits_back_and_forth_gives_identical_logits():
    loaded = tiny_loaded()
    result = calibrate(loaded.model, CalibrationConfig(**SMALL), _tokens(), progress=False)
    tokens = _tokens(2, 16, seed=1)
    bits = result.bit_config.bits
    with torch.no_grad():
        first = {}
        for b in bits:
            set_bits(loaded.model, b)
            first[b] = loaded.model(tokens).logits
        for b, other in zip(bits, reversed(bits)):
            set_bits(loaded.model, other)
            loaded.model(tokens)
            set_bits(loaded.model, b)
            assert torch.equal(loaded.model(tokens).logits, first[b]), b
    assert not torch.equal(first[3], first[8])


def test_resume_after_an_interrupt_gives_the_same_state(tmp_path, monkeypatch):
    config = CalibrationConfig(**SMALL)
    reference_model = tiny_loaded().model
    reference = calibrate(reference_model, config, _tokens(), checkpoint_dir=tmp_path / "a", progress=False)

    save_block = CalibrationCheckpoint.save_block

    def interrupt_after_first_block(self, k, *args):
        save_block(self, k, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationCheckpoint, "save_block", interrupt_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_loaded().model, config, _tokens(), checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(CalibrationCheckpoint, "save_block", save_block)
    resumed_model = tiny_loaded().model
    resumed = calibrate(resumed_model, config, _tokens(), checkpoint_dir=tmp_path / "b", progress=False)

    assert resumed.resumed_from == 1
    assert [r.last_loss for r in resumed.records] == [r.last_loss for r in reference.records]
    expected, actual = trainable_state(reference.elastic), trainable_state(resumed.elastic)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    tokens = _tokens(2, 16, seed=1)
    with torch.no_grad():  # the finished blocks' input scales are folded into the weights again
        for bits in (3, None):
            set_bits(reference_model, bits)
            set_bits(resumed_model, bits)
            assert torch.equal(resumed_model(tokens).logits, reference_model(tokens).logits), bits


def test_a_checkpoint_of_other_data_is_not_resumed(tmp_path):
    config = CalibrationConfig(**SMALL)
    calibrate(tiny_loaded().model, config, _tokens(seed=0), checkpoint_dir=tmp_path, progress=False)
    other = calibrate(tiny_loaded().model, config, _tokens(seed=1), checkpoint_dir=tmp_path, progress=False)
    assert other.resumed_from == 0


def test_summary_lists_every_block_and_bit():
    loaded = tiny_loaded()
    config = CalibrationConfig(**SMALL)
    lines = summary_lines(calibrate(loaded.model, config, _tokens(), progress=False), config)
    assert lines[0].startswith("block") and "w5/6" in lines[0]
    assert len([line for line in lines if line.strip()[:1].isdigit()]) == 2 + len(config.bit_config.bits)
    assert any(line.split()[:2] == ["4", "64"] for line in lines)


def test_presets_and_config_errors_name_the_field():
    assert CalibrationConfig.from_preset("fast").steps_per_block < CalibrationConfig.from_preset("default").steps_per_block
    with pytest.raises(ValueError, match="unknown calibration preset 'slow'; allowed: fast, default"):
        CalibrationConfig.from_preset("slow")
    with pytest.raises(ValueError, match="CalibrationConfig.n_samples must be a positive integer"):
        CalibrationConfig(n_samples=0)
    with pytest.raises(ValueError, match="CalibrationConfig.equalize_grid must be in 1..20"):
        CalibrationConfig(equalize_grid=0)
    with pytest.raises(ValueError, match="CalibrationConfig.tome_weights needs one weight per tier"):
        CalibrationConfig(tome_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="tokens must be a LongTensor"):
        calibrate(tiny_loaded().model, CalibrationConfig(**SMALL), torch.zeros(4, 32), progress=False)


def test_config_round_trips_through_its_dict():
    config = CalibrationConfig.from_preset("fast", seed=7)
    assert CalibrationConfig.from_dict(config.to_dict()) == CalibrationConfig(**{
        **{f: getattr(config, f) for f in config.__dataclass_fields__}, "tome_weights": config.merge_weights})


def test_the_fast_preset_starts_the_per_row_width_unclipped():
    assert CalibrationConfig.from_preset("default").searched_clip_bits == (3, 4, 5, 6, 7, 8)
    assert CalibrationConfig.from_preset("fast").searched_clip_bits == (3, 4, 5, 6, 7)  # 8 bits: one group per row
    config = CalibrationConfig(**{**SMALL, "clip_lr": 0.0, "end_to_end_steps": 0, "search_row_clips": False})
    result = calibrate(tiny_loaded().model, config, _tokens(), progress=False)
    for linear in result.elastic.values():
        for bits in config.bit_config.bits:
            unsearched = bool((linear.clip_up[str(bits)] == NO_SHRINK_LOGIT).all())
            assert unsearched == (bits == 8), (bits, linear.clip_up[str(bits)])
