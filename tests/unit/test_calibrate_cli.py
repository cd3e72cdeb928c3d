"""`quept calibrate` refuses bad input with one line naming the option and what is allowed."""

import pytest
from typer.testing import CliRunner

from service.cli import app


@pytest.mark.parametrize("args,message", [
    (["--preset", "slow"], "unknown calibration preset 'slow'; allowed: fast, default"),
    (["--device", "tpu"], "--device must be one of auto, cpu, cuda; got 'tpu'"),
    (["--calib-text", "/nonexistent/calib.txt"], "--calib-text: file not found: /nonexistent/calib.txt"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = CliRunner().invoke(app, ["calibrate", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
