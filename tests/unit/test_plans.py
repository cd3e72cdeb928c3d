import pytest

from quept_core.plans import Plan, PrecisionError, parse_precision, uniform_plan

BITS = (3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize(
    ("text", "kind", "bits"),
    [("auto", "auto", None), ("fp", "fp", None), ("w4", "uniform", 4.0), ("W8", "uniform", 8.0),
     ("mixed:3.5", "mixed", 3.5), ("mixed:3", "mixed", 3.0)],
)
def test_parse_valid_precisions(text, kind, bits):
    spec = parse_precision(text, BITS)
    assert (spec.kind, spec.bits) == (kind, bits)


@pytest.mark.parametrize("text", ["w2", "w9", "int4", "mixed:2.5", "mixed:9", "mixed:", ""])
def test_unknown_precision_lists_allowed_values(text):
    with pytest.raises(PrecisionError, match=r"allowed: auto, fp, w3, w4, w5, w6, w7, w8, mixed:<avg bits in 3\.\.8>"):
        parse_precision(text, BITS)


def test_average_bits_is_parameter_weighted():
    plan = Plan("mixed:5.00", {"small": 8, "big": 4})
    assert plan.average_bits({"small": 100, "big": 300}) == pytest.approx((8 * 100 + 4 * 300) / 400)
    assert plan.label == "mixed" and plan.mode == "mixed"


def test_uniform_plan_labels():
    assert uniform_plan(["a", "b"], 4).label == "w4"
    fp = uniform_plan(["a"], None)
    assert fp.mode == "fp" and fp.average_bits({"a": 10}) is None
