"""The README's "Use as a library" example runs as written, on a tiny model instead of the default one."""

from __future__ import annotations

import re
from pathlib import Path

from tiny_lm import tiny_folder, tiny_text

README = Path(__file__).resolve().parents[2] / "README.md"


def library_example() -> str:
    section = README.read_text().split("## Use as a library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_runs(tmp_path, capsys, one_thread):
    code = library_example()
    settings = {
        "MODEL": repr(str(tiny_folder(tmp_path / "model"))),
        "CALIBRATION_TEXT": repr(str(tiny_text(tmp_path / "calib.txt", words=2100))),
        "ARTIFACT": repr(str(tmp_path / "artifact")),
    }
    for name, value in settings.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert count == 1, f"the example no longer sets {name}"
    exec(compile(code, str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["w8", "w4", "w3"]
    assert (tmp_path / "artifact" / "manifest.json").is_file()
