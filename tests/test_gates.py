"""rewrite.gates: which CI gates a plan passes, and by how much it missed or had to spare."""

from plans import FIVE_GATES, slim_neck_l
from reference import SLIM_NECK

import rewrite
import rewrite.report
from rewrite.gates import GateResult, check_gates


def test_gates_say_which_missed_and_by_how_much():
    gates = check_gates(slim_neck_l(), **FIVE_GATES)
    assert [(g.gate, g.passed) for g in gates] == [
        ("fail-on-no-match", True),
        ("max-params", True),
        ("max-flops", False),
        ("min-params-reduction", True),
        ("min-flops-reduction", False),
    ]
    assert (
        gates[2].measured == SLIM_NECK["yolov5l"][1]
        and gates[2].margin == 90_000_000_000 - SLIM_NECK["yolov5l"][1]
    )
    assert gates[2].detail == "missed by 6,927,744,000 FLOPs"
    assert gates[4].detail == "missed by 0.93 percentage points"
    assert gates[1].detail == "41,219 params to spare"

    nothing = slim_neck_l(sites=[], unmatched_rules=["csp-to-vovgscsp", "conv-to-gsconv"])
    no_match = GateResult("fail-on-no-match", "max", 0, 2, "rules")
    assert check_gates(nothing, fail_on_no_match=True) == [no_match]
    assert check_gates(nothing, fail_on_no_match=True)[0].detail == "2 rules matched nothing"
    assert check_gates(nothing) == []


def test_gate_policy_lives_in_its_own_module_and_keeps_its_old_names():
    assert rewrite.report.check_gates is rewrite.check_gates is check_gates
    assert rewrite.report.GateResult is rewrite.GateResult is GateResult
