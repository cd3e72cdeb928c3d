"""Request and response bodies of every route (serving-conventions.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from quept_core.runtime.sampling import MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 8
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
LOGPROBS_MEANING = ("natural log-probabilities of the raw model, before repetition penalty, temperature, "
                    "top-k and top-p (vLLM's default)")


def _stop_list(value: object) -> object:
    """`stop` may be null, one string or a list of strings."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _no_empty_stops(value: list[str]) -> list[str]:
    if any(not s for s in value):
        raise ValueError("stop strings must not be empty")
    return value


def _needs(switch: str):
    """A validator: the field may be given only when the earlier field `switch` is true."""

    def check(value: object, info: ValidationInfo) -> object:
        if value is not None and not info.data.get(switch):
            raise ValueError(f"{switch} must be true to use this field")
        return value

    return check


def _unsupported(value: object) -> object:
    if value:
        raise ValueError("is not supported by this server (leave it unset or 0)")
    return value


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class PrecisionFields(BaseModel):
    """The elastic-precision controls, shared by the native and the OpenAI-compatible routes."""

    latency_budget_ms: float | None = Field(None, gt=0, description="end-to-end target for this request")
    memory_budget_mb: float | None = Field(None, gt=0, description="cap (MiB) on plan weights + this request's KV")
    min_precision: str | None = Field(None, description="floor for auto and degradation: fp, w<b> or mixed:<avg>")
    allow_degrade: bool = Field(True, description="may a cheaper plan serve under load or budget pressure")


class GenerateRequest(PrecisionFields):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, description="raw prompt; exactly one of prompt and messages")
    messages: list[Message] | None = Field(None, min_length=1, description="chat turns (chat template)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    precision: str = Field("auto", description="auto, fp, w<b> or mixed:<avg bits>; the x-quept-precision "
                                               "header applies when this field is not sent")
    details: bool = Field(False, description=f"per-token ids, texts and {LOGPROBS_MEANING} (TGI's details)")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with details: the likeliest alternatives at each position")

    _stop_list = field_validator("stop", mode="before")(_stop_list)
    _no_empty = field_validator("stop")(_no_empty_stops)
    _top_n_needs_details = field_validator("top_n_tokens")(_needs("details"))

    @property
    def engine_logprobs(self) -> int | None:
        """SamplingParams.logprobs: the alternatives to report at each position, None for none."""
        return (self.top_n_tokens or 0) if self.details else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class PlanView(BaseModel):
    name: str
    mode: Literal["fp", "uniform", "mixed"]
    nominal_bits: float | None  # parameter-weighted bit-width of the codes; None for the unquantized reference
    bits_by_layer_type: dict[str, float | None]
    lm_head_bits: int | None


class PrecisionView(BaseModel):
    requested: str
    served: str
    plan: PlanView
    degraded: bool
    reason: str | None


class TimingView(BaseModel):
    queue_ms: float
    ttft_ms: float
    total_ms: float
    decode_tokens_per_s: float | None
    predicted_total_ms: float | None = None  # what the controller predicted for the tokens generated
    predicted_queue_ms: float | None = None  # what it predicted for the wait before its prefill step
    predicted_ttft_ms: float | None = None  # what it predicted for the first token (queue and prefill)


class GenerateResponse(BaseModel):
    generated_text: str
    finish_reason: Literal["length", "stop", "eos"]
    usage: Usage
    precision: PrecisionView
    timing: TimingView
    seed: int | None
    details: Details | None = None


class PredictionView(BaseModel):
    latency_ms: float
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    memory_mb: float
    weights_mb: float
    kv_cache_mb: float


class PlanResponse(BaseModel):
    precision: PrecisionView
    predicted: PredictionView
    usage: Usage


class TokenView(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # with details


class TokenDetail(BaseModel):
    id: int
    text: str  # the token alone, decoded (U+FFFD for part of a character)
    logprob: float
    special: bool


class Details(BaseModel):
    tokens: list[TokenDetail]
    top_tokens: list[list[TokenDetail]]  # per position, top_n_tokens alternatives, likeliest first


class StreamToken(BaseModel):
    token: TokenView
    index: int
    top_tokens: list[TokenDetail] | None = None  # with details and top_n_tokens


# ---- OpenAI-compatible ------------------------------------------------------------------------


class OpenAIFields(PrecisionFields):
    """Fields common to both OpenAI routes; unknown fields are ignored as OpenAI servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="choices, sharing one prefill; sampled ones draw seeds seed, seed + 1, ...")
    stream: bool = False
    stream_options: dict | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, description="not supported: 0 only")
    frequency_penalty: float = Field(0.0, description="not supported: 0 only")
    # Extensions (send with extra_body). precision must agree with the x-quept-precision header and the
    # model id's suffix when they are sent too; the header overrides the suffix.
    precision: str | None = None
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)

    _stop_list = field_validator("stop", mode="before")(_stop_list)
    _no_empty = field_validator("stop")(_no_empty_stops)

    _unsupported = field_validator("presence_penalty", "frequency_penalty")(_unsupported)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(OpenAIFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="not supported")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                 description=f"the chosen token's and this many alternatives' {LOGPROBS_MEANING}")

    _no_echo = field_validator("echo")(_unsupported)

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt string (batched prompts are not supported)")
            return value[0]
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict]) -> str:
        if isinstance(value, str):
            return value
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
            raise ValueError("only text content parts are supported")
        return "".join(part["text"] for part in value)


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description=f"each output token's {LOGPROBS_MEANING}")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: the likeliest alternatives at each position")

    _top_needs_logprobs = field_validator("top_logprobs")(_needs("logprobs"))

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
