"""Service configuration: `QUEPT_*` environment variables, overridden by `quept serve` flags.

Every field is both (`QUEPT_MAX_QUEUE`, `--max-queue`); the README's Configure section documents them all and a
unit test keeps the two in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as CliError

from quept_core.io.models import DEFAULT_MODEL


class SettingsError(ValueError):
    """A setting has a value the service cannot start with; the message is one line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUEPT_", extra="ignore", frozen=True, cli_kebab_case=True,
                                      cli_prog_name="quept serve", cli_exit_on_error=False,
                                      cli_implicit_flags=False)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    model: str = Field(DEFAULT_MODEL, description="model name, .gguf file or Hugging Face folder")
    artifact: Path | None = Field(None, description="calibrated artifact folder; default: the cached one, "
                                                    "calibrated on first start")
    preset: str = Field("fast", description="calibration preset used when the artifact must be created")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="compute device; auto picks CUDA if present")
    threads: int | None = Field(None, ge=1, description="CPU threads for PyTorch (null: PyTorch's choice)")
    adaptive_threads: bool = Field(True, description="run a step's prefill or decode on one thread while that "
                                                     "measures faster (other work competing for the cores)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish "
                                                           "before they are aborted")
    max_queue: int = Field(64, ge=1, description="requests waiting for a free slot; beyond it, 503")
    max_queue_tokens: int = Field(65536, ge=1, description="prompt tokens of waiting requests; beyond it, 503")
    queue_timeout_s: float = Field(60.0, gt=0, description="a request still queued after this long fails with 503")
    max_running: int = Field(16, ge=1, description="sequences decoded together, any mix of precisions "
                                                   "(the engine's KV slots); also the largest n")
    memory_limit_mb: float | None = Field(None, gt=0, description="resident packed-weight limit (MiB) "
                                                                  "for the runtime's pack cache (null: no limit)")
    max_new_tokens_limit: int = Field(512, ge=1, description="largest max_new_tokens / max_tokens accepted")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body; beyond it, 413")
    brownout_queue_depth: int = Field(8, ge=1, description="requests waiting for a slot (beyond those the next "
                                                          "step admits) at which auto and degradable requests "
                                                          "get cheaper plans (one step per multiple)")
    ewma_alpha: float = Field(0.05, gt=0, le=1, description="weight of one step in the slow refinement of a "
                                                            "bit-width's relative cost")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit_mb is None else int(self.memory_limit_mb * 2**20)


def load_settings(args: list[str] | None = None) -> Settings:
    """Settings from the environment with command-line flags on top; errors are one line."""
    try:
        return Settings(_cli_parse_args=args or [])
    except CliError as error:
        raise SettingsError(str(error)) from None
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        raise SettingsError(f"QUEPT_{field.upper()} / --{field.replace('_', '-')}: {first['msg']}") from None
