from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load_settings

TABLE = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_with_its_flag_and_default():
    for name, field in Settings.model_fields.items():
        row = next((line for line in TABLE.splitlines() if line.startswith(f"| `QUEPT_{name.upper()}` |")), None)
        assert row is not None, f"QUEPT_{name.upper()} is missing from the README's settings table"
        assert f"`--{name.replace('_', '-')}`" in row
        default = field.default
        shown = "none" if default is None else f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        assert shown in row, (name, shown, row)


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("QUEPT_PORT", "9001")
    monkeypatch.setenv("QUEPT_MAX_QUEUE", "5")
    monkeypatch.setenv("QUEPT_LOG_LEVEL", "debug")
    settings = load_settings(["--max-queue", "7", "--artifact", "/data/a"])
    assert settings.port == 9001 and settings.max_queue == 7 and settings.log_level == "DEBUG"
    assert settings.artifact == Path("/data/a")


def test_bad_values_are_one_line_errors_naming_the_setting(monkeypatch):
    monkeypatch.setenv("QUEPT_MAX_QUEUE", "0")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert str(raised.value).startswith("QUEPT_MAX_QUEUE / --max-queue:") and "\n" not in str(raised.value)
    with pytest.raises(SettingsError, match="unrecognized arguments: --colour"):
        load_settings(["--colour", "blue"])


@pytest.mark.parametrize(("value", "expected"), [("64", 64 * 2**20), ("0.5", 2**19)])
def test_memory_limit_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("QUEPT_MEMORY_LIMIT_MB", value)
    assert load_settings().memory_limit_bytes == expected


def test_no_memory_limit_by_default(monkeypatch):
    monkeypatch.delenv("QUEPT_MEMORY_LIMIT_MB", raising=False)
    assert load_settings().memory_limit_bytes is None


@pytest.mark.parametrize("value", ["lots", "-3", "0"])
def test_bad_memory_limit_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("QUEPT_MEMORY_LIMIT_MB", value)
    with pytest.raises(SettingsError, match="QUEPT_MEMORY_LIMIT_MB"):
        load_settings()
