import pickle

import pytest

from quept_core.config import BitConfig
from quept_core.planning.bits import FP_BITS, nominal_bits, storage_bits
from quept_core.planning.plan import Plan, uniform_plan
from quept_core.precision import FP, Precision, PrecisionError, allowed_precisions, metric_labels

BITS = (3, 4, 5, 6, 7, 8)


@pytest.mark.parametrize(
    ("text", "expected", "name"),
    [("auto", Precision("auto"), "auto"), ("fp", FP, "fp"), ("w4", Precision.uniform(4), "w4"),
     (" W8 ", Precision.uniform(8), "w8"), ("mixed:3.5", Precision.mixed(3.5), "mixed:3.50"),
     ("mixed:3", Precision.mixed(3.0), "mixed:3.00")],
)
def test_parse_valid_precisions(text, expected, name):
    precision = Precision.parse(text, BITS)
    assert precision == expected and precision.name == name


@pytest.mark.parametrize("text", ["w2", "w9", "int4", "mixed:2.5", "mixed:9", "mixed:", ""])
def test_unknown_precision_lists_allowed_values(text):
    with pytest.raises(PrecisionError, match=r"allowed: auto, fp, w3, w4, w5, w6, w7, w8, "
                                             r"mixed:<storage bits per weight in 3\.\.8>"):
        Precision.parse(text, BITS)


def test_precision_fields_follow_the_kind():
    with pytest.raises(ValueError):
        Precision("uniform")
    with pytest.raises(ValueError):
        Precision("fp", width=4)
    assert Precision.mixed(4.5).label == "mixed" and Precision.uniform(3).label == "w3" and FP.label == "fp"
    assert metric_labels((3, 4)) == ["fp", "w3", "w4", "mixed"]
    assert allowed_precisions((4,))[:3] == ["auto", "fp", "w4"]


def test_plans_are_interned_and_compare_by_content():
    first = Plan(Precision.mixed(5.0), {"small": 8, "big": 4}, 8)
    again = Plan(Precision.mixed(5.0), dict([("big", 4), ("small", 8)]), 8)
    assert first is again and hash(first) == hash(again)
    assert Plan(Precision.mixed(5.0), {"small": 8, "big": 4}, None) != first  # head bits are content
    assert {first: "x"}[again] == "x"
    assert pickle.loads(pickle.dumps(first)) is first
    with pytest.raises(AttributeError):
        first.lm_head_bits = 4
    with pytest.raises(TypeError):
        first.layer_bits["small"] = 3
    with pytest.raises(TypeError):
        Plan(Precision("auto"), {})
    assert first.with_head_bits(None) == Plan(Precision.mixed(5.0), {"small": 8, "big": 4})


def test_nominal_and_storage_bits_are_parameter_weighted():
    shapes = {"small": (10, 64), "big": (30, 64)}
    plan = Plan(Precision.mixed(5.0), {"small": 8, "big": 4})
    assert nominal_bits(plan, shapes) == pytest.approx((8 * 10 + 4 * 30) / 40)
    config = BitConfig()
    # groups of 64 at 4 bits: a 16-bit scale and an 8-bit zero-point per 64 weights; 8 bits per row
    expected = ((8 + 24 / 64) * 10 + (4 + 24 / 64) * 30) / 40
    assert storage_bits(plan, shapes, config) == pytest.approx(expected)
    assert plan.label == "mixed" and plan.mode == "mixed"


def test_uniform_plan_labels():
    assert uniform_plan(["a", "b"], 4).label == "w4"
    fp = uniform_plan(["a"], None)
    assert fp.mode == "fp" and fp.precision == FP and nominal_bits(fp, {"a": (2, 5)}) == FP_BITS
