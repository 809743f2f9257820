"""A hand-built plan with slim-neck YOLOv5-L's totals (tests/reference.py) and one of everything: what the
tests of code that reads plans (the report, the gates) read."""

import dataclasses

from reference import BASE, SLIM_NECK

from rewrite.planner import BlockSummary, Delta, Plan, Rejection, ShapeCheck, SiteChange, StageChange
from rewrite.tracer import Leaf

SLIM_NECK_L = Plan(
    model_name="yolov5l",
    rule_set="slim-neck",
    scope="neck",
    input_shapes=[(1, 3, 640, 640)],
    device="meta",
    sites=[
        SiteChange(
            "model.10",
            "conv-to-gsconv",
            "neck",
            "module",
            BlockSummary("Conv", 1024, 512, stride=1, kernel_size=1),
            BlockSummary("GSConv", 1024, 512, stride=1, kernel_size=1),
            Delta(525_312, 269_568),
            Delta(859_832_320, 441_548_800),
        ),
        SiteChange(
            "model.13",
            "csp-to-vovgscsp",
            "neck",
            "module",
            BlockSummary("C3", 1024, 512, stride=1),
            BlockSummary("VoVGSCSP", 1024, 512, stride=1, n=3),
            Delta(2_757_632, 1_600_000),
            Delta(9_000_000_000, 6_000_000_000),
        ),
    ],
    rejected=[Rejection("model.24.m.0", "conv-to-gsconv", "out_channels 255 is not a multiple of 2")],
    leaves=[Leaf("model.24", "Detect", "symbolically traced variables cannot be used in control flow")],
    warnings=["slim-neck.toml: rule 'c2f-to-vovgscsp' matched nothing in stage 'neck'"],
    params=Delta(BASE["yolov5l"][0], SLIM_NECK["yolov5l"][0]),
    flops=Delta(BASE["yolov5l"][1], SLIM_NECK["yolov5l"][1]),
    stages={
        "backbone": StageChange(Delta(27_000_000, 27_000_000), Delta(60_000_000_000, 60_000_000_000)),
        "neck": StageChange(Delta(19_000_000, 12_395_072), Delta(48_000_000_000, 35_934_003_200)),
        "head": StageChange(Delta(563_709, 563_709), Delta(993_740_800, 993_740_800)),
        "other": StageChange(Delta(0, 0), Delta(0, 0)),
    },
    shape_check=ShapeCheck(True, "2 outputs, shapes unchanged"),
)


def slim_neck_l(**changes) -> Plan:
    return dataclasses.replace(SLIM_NECK_L, **changes)


# Five gates on that plan: three pass, max-flops and min-flops-reduction miss.
FIVE_GATES = {
    "fail_on_no_match": True,
    "max_params": 40_000_000,
    "max_flops": 90_000_000_000,
    "min_params_reduction": 10,
    "min_flops_reduction": 12.0,
}
