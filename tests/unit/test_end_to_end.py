"""The end-to-end stage on a tiny random LLaMA: it lowers the KL it trains on, touches only the tuned
tiers, and resumes from its checkpoint to the same state."""

import pytest
import torch

from quept_core.calibration import loop
from quept_core.calibration.checkpoint import CalibrationCheckpoint
from quept_core.calibration.end_to_end import EndToEndTuning, next_token_kl, tune_end_to_end, tuned_tiers
from quept_core.calibration.loop import CalibrationConfig, calibrate, summary_lines
from quept_core.config import BitConfig
from quept_core.quant.elastic import set_bits, trainable_state
from tests.unit.test_calibrate import SMALL, _tokens
from tests.unit.tiny_llama import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS_ONLY = CalibrationConfig(**{**SMALL, "end_to_end_steps": 0})


@torch.no_grad()
def _kl(model, tokens, bits: int) -> float:
    set_bits(model, None)
    teacher = torch.log_softmax(model(tokens).logits.float(), -1)
    set_bits(model, bits)
    value = next_token_kl(torch.log_softmax(model(tokens).logits.float(), -1), teacher).item()
    set_bits(model, None)
    return value


def test_tuned_tiers_are_those_with_a_lora_rank():
    assert tuned_tiers(BitConfig()) == ((3,), (4,))
    assert tuned_tiers(BitConfig(tier_ranks=(32, 24, 16, 8))) == ((3,), (4,), (5, 6), (7, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stage_lowers_the_kl_of_every_tuned_width_and_leaves_the_others(dtype):
    loaded = tiny_loaded()
    tokens = _tokens()
    result = calibrate(loaded.model, BLOCKS_ONLY, tokens, progress=False)
    before = {bits: _kl(loaded.model, tokens, bits) for bits in (3, 4)}
    state_before = {key: value.clone() for key, value in trainable_state(result.elastic).items()}
    tuning = EndToEndTuning(loaded.model, result.elastic, BLOCKS_ONLY.bit_config, steps=16, lora_lr=5e-4,
                            clip_lr=1e-2, min_lr_factor=10.0, seed=0, dtype=dtype)
    head_dtypes = set()
    hook = loaded.model.lm_head.register_forward_hook(lambda _m, _args, out: head_dtypes.add(out.dtype))
    tune_end_to_end(tuning, tokens, batch_size=2, progress=False)
    hook.remove()
    assert head_dtypes == {torch.float32, dtype}  # the teacher's pass in float32, the tuned passes in `dtype`
    assert not torch.is_autocast_enabled("cpu")
    after = {bits: _kl(loaded.model, tokens, bits) for bits in (3, 4)}
    assert all(after[bits] < 0.75 * before[bits] for bits in (3, 4)), (before, after)
    state_after = trainable_state(result.elastic)
    changed = {key for key in state_before if not torch.equal(state_before[key], state_after[key])}
    assert any(key.endswith(".lora_A") for key in changed) and any(key.endswith(".clip_up.3") for key in changed)
    assert not any(key.rsplit(".", 1)[-1] in ("5", "6", "7", "8") for key in changed), sorted(changed)[:5]
    assert not any(key.endswith(".input_scale") for key in changed)
    assert all(not parameter.requires_grad for parameter in tuning.lora + tuning.clips)
    # The stage's layer checkpointing (training mode) is undone: the model serves and scores as before.
    assert not loaded.model.training
    assert not any(getattr(module, "gradient_checkpointing", False) for module in loaded.model.modules())


def test_calibration_reports_the_stage_in_its_result_and_summary():
    config = CalibrationConfig(**{**SMALL, "end_to_end_steps": 6})
    result = calibrate(tiny_loaded().model, config, _tokens(), progress=False)
    record = result.end_to_end
    assert record.bits == [3, 4] and record.steps == 6
    assert len(record.first_kl) == len(record.last_kl) == 2
    assert "seconds" not in record.losses()
    assert any(line.startswith("end-to-end: 6 steps") and "first pass -> last: w3" in line
               for line in summary_lines(result, config))
    one_pass = CalibrationConfig(**{**SMALL, "end_to_end_steps": 2})  # 4 sequences, 2 a step
    lines = summary_lines(calibrate(tiny_loaded().model, one_pass, _tokens(), progress=False), one_pass)
    assert any(line.startswith("end-to-end: 2 steps") and "over its one pass: w3" in line for line in lines)
    assert calibrate(tiny_loaded().model, BLOCKS_ONLY, _tokens(), progress=False).end_to_end is None


def test_an_interrupted_stage_resumes_from_its_checkpoint_to_the_same_state(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "END_TO_END_CHECKPOINT_EVERY", 2)
    config = CalibrationConfig(**{**SMALL, "end_to_end_steps": 5})
    reference = calibrate(tiny_loaded().model, config, _tokens(), checkpoint_dir=tmp_path / "a", progress=False)

    save = CalibrationCheckpoint.save_end_to_end
    saved_steps = []

    def interrupt_after_second_save(self, elastic, state):
        save(self, elastic, state)
        saved_steps.append(state["step"])
        if len(saved_steps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(CalibrationCheckpoint, "save_end_to_end", interrupt_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        calibrate(tiny_loaded().model, config, _tokens(), checkpoint_dir=tmp_path / "b", progress=False)
    assert saved_steps == [2, 4]
    assert sorted(p.name for p in (tmp_path / "b").glob("end-to-end-*")) == ["end-to-end-00004.pt",
                                                                            "end-to-end-00004.safetensors"]
    monkeypatch.setattr(CalibrationCheckpoint, "save_end_to_end", save)
    resumed = calibrate(tiny_loaded().model, config, _tokens(), checkpoint_dir=tmp_path / "b", progress=False)

    assert resumed.resumed_from == len(resumed.records)  # every block came from the checkpoint
    assert resumed.end_to_end.losses() == reference.end_to_end.losses()
    expected, actual = trainable_state(reference.elastic), trainable_state(resumed.elastic)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="CalibrationConfig.end_to_end_steps must be an integer >= 0"):
        CalibrationConfig(end_to_end_steps=-1)
    with pytest.raises(ValueError, match="CalibrationConfig.end_to_end_lora_lr must be >= 0"):
        CalibrationConfig(end_to_end_lora_lr=-1e-3)
    with pytest.raises(ValueError, match="CalibrationConfig.end_to_end_dtype must be one of bfloat16, float32, "
                                         "got 'float16'"):
        CalibrationConfig(end_to_end_dtype="float16")


def test_dropout_stays_off_while_the_stage_trains_and_its_rate_comes_back():
    states = []
    for rate in (0.0, 0.5):
        loaded = tiny_loaded(attention_dropout=rate)
        result = calibrate(loaded.model, CalibrationConfig(**{**SMALL, "end_to_end_steps": 2}), _tokens(),
                           progress=False)
        states.append(trainable_state(result.elastic))
        rates = [m.attention_dropout for m in loaded.model.modules() if hasattr(m, "attention_dropout")]
        assert rates and all(r == rate for r in rates)
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
