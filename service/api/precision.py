"""Which precision a request asks for, and where it said so.

Three places may name it: a body field (`precision`), the `x-quept-precision` header and, on the
OpenAI-compatible routes, the model id's suffix (`smollm2-135m@w4`). The body field comes first, then
the header, then the suffix, then `auto`. A body field that names another precision than the header
or the suffix is refused, naming both: the client said two things and the server will not guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from quept_core.precision import AUTO, Precision, PrecisionError
from service.errors import invalid

HEADER = "x-quept-precision"
MODEL_FIELD = "model"


@dataclass(frozen=True)
class Asked:
    text: str  # as the client wrote it
    field: str  # the body field, the header or "model": what an error about it names


def asked_precision(bit_set: tuple[int, ...], body: str | None, header: str | None, suffix: str | None = None,
                    body_field: str = "precision") -> Asked:
    given = [Asked(text, field) for text, field in ((body, body_field), (header, HEADER), (suffix, MODEL_FIELD))
             if text is not None]
    if not given:
        return Asked(AUTO.name, body_field)
    first = given[0]
    if first.field == body_field:
        for other in given[1:]:
            if _parse(first, bit_set) != _parse(other, bit_set):
                raise invalid(f"{body_field}: '{first.text}' disagrees with {_where(other)} '{other.text}'; "
                              f"send one of them, or the same precision in both", body_field)
    return first


def _parse(asked: Asked, bit_set: tuple[int, ...]) -> Precision:
    try:
        return Precision.parse(asked.text, bit_set)
    except PrecisionError as error:
        raise invalid(f"{asked.field}: {error}", asked.field) from None


def _where(asked: Asked) -> str:
    return "the model id's suffix" if asked.field == MODEL_FIELD else f"the {asked.field} header"
