"""rewrite.report: every format of a plan (and a profile) parses, carries the figures and is safe to open."""

import dataclasses
import json
import re
from html.parser import HTMLParser

import pytest
import torch

from rewrite.planner import Delta, Plan, Rejection, ShapeCheck, SiteChange, StageChange, plan
from rewrite.profiler import Cost, Profile
from rewrite.report import FORMATS, JSON_SCHEMA_VERSION, GateResult, check_gates, render, render_profile
from rewrite.tracer import Leaf
from rewrite.zoo import create_model

# docs/report-schema.md, as types: a dict is a nested object, a list [T] an array of T.
DELTA = {"before": int, "after": int, "change": int, "percent": float}
LEAF = {"path": str, "type_name": str, "reason": str}
PLAN_SCHEMA = {
    "schema_version": int,
    "report": str,
    "model": str,
    "rules": str,
    "scope": str,
    "input_shapes": [[int]],
    "device": str,
    "totals": {"params": DELTA, "flops": DELTA},
    "stages": dict,
    "sites": [
        {
            "path": str,
            "rule": str,
            "stage": (str, type(None)),
            "kind": str,
            "before": str,
            "after": str,
            "params": DELTA,
            "flops": DELTA,
        }
    ],
    "rejected": [{"path": str, "rule": str, "reason": str}],
    "leaves": [LEAF],
    "needed_real_data": [LEAF],
    "warnings": [str],
    "shape_check": {"passed": bool, "detail": str},
}
GATE = {
    "gate": str,
    "limit": str,
    "threshold": (int, float),
    "measured": (int, float),
    "unit": str,
    "passed": bool,
    "margin": (int, float),
    "detail": str,
}
PROFILE_SCHEMA = {
    "schema_version": int,
    "report": str,
    "model": str,
    "input_shapes": [[int]],
    "device": str,
    "totals": {"params": int, "flops": int, "macs": int},
    "stages": dict,
    "modules": [{"path": str, "params": int, "flops": int, "macs": int}],
    "needed_real_data": [LEAF],
}


def follows(value, schema, where="report"):
    """Assert that ``value`` has every key of ``schema`` with the type it names."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        for key, sub in schema.items():
            assert key in value, f"{where}: missing {key!r}"
            follows(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            follows(item, schema[0], f"{where}[{i}]")
    else:
        assert isinstance(value, schema) and not (schema is int and isinstance(value, bool)), where


# A hand-built plan with slim-neck YOLOv5-L's totals (REFERENCE.md §3) and one of everything.
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
            "Conv(1024→512, k1, s1)",
            "GSConv(1024→512, k1, s1)",
            Delta(525_312, 269_568),
            Delta(859_832_320, 441_548_800),
        ),
        SiteChange(
            "model.13",
            "csp-to-vovgscsp",
            "neck",
            "module",
            "C3(1024→512, s1, n=3)",
            "VoVGSCSP(1024→512, s1, n=3)",
            Delta(2_757_632, 1_600_000),
            Delta(9_000_000_000, 6_000_000_000),
        ),
    ],
    rejected=[Rejection("model.24.m.0", "conv-to-gsconv", "out_channels 255 is not a multiple of 2")],
    leaves=[Leaf("model.24", "Detect", "symbolically traced variables cannot be used in control flow")],
    warnings=["slim-neck.toml: rule 'c2f-to-vovgscsp' matched nothing in stage 'neck'"],
    params=Delta(46_563_709, 39_958_781),
    flops=Delta(108_993_740_800, 96_927_744_000),
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


def markdown_tables(text: str) -> list[list[str]]:
    """The pipe tables in a markdown text, each as its lines."""
    return [block.splitlines() for block in re.findall(r"(?m)(?:^\|.*\|\n?)+", text)]


class ResourceFinder(HTMLParser):
    """Collects the tags that would make a browser fetch something or run code."""

    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        fetching = {"script", "link", "iframe", "object", "embed", "img", "image", "use"}
        if tag in fetching or names & {"src", "href"}:
            self.found.append(tag)
        self.found += [f"{tag}[{name}]" for name in names if name.startswith("on")]


def test_json_follows_the_schema_and_carries_the_figures():
    data = json.loads(render(slim_neck_l(), "json"))
    follows(data, PLAN_SCHEMA)
    assert data["schema_version"] == JSON_SCHEMA_VERSION == 1 and data["report"] == "plan"
    assert data["totals"]["params"] == {
        "before": 46_563_709,
        "after": 39_958_781,
        "change": -6_604_928,
        "percent": -14.1847,
    }
    assert data["totals"]["flops"]["percent"] == -11.0704
    assert list(data["stages"]) == ["backbone", "neck", "head", "other"]
    follows(data["stages"]["neck"], {"params": DELTA, "flops": DELTA})
    assert [site["path"] for site in data["sites"]] == ["model.10", "model.13"]
    assert data["input_shapes"] == [[1, 3, 640, 640]]
    assert "gates" not in data and "gates_passed" not in data  # only when gates ran
    assert render(slim_neck_l(), "json") == render(slim_neck_l(), "json")  # stable for CI diffs


def test_gates_say_which_missed_and_by_how_much():
    gates = check_gates(
        slim_neck_l(),
        fail_on_no_match=True,
        max_params=40_000_000,
        max_flops=90_000_000_000,
        min_params_reduction=10,
        min_flops_reduction=12.0,
    )
    assert [(g.gate, g.passed) for g in gates] == [
        ("fail-on-no-match", True),
        ("max-params", True),
        ("max-flops", False),
        ("min-params-reduction", True),
        ("min-flops-reduction", False),
    ]
    assert gates[2].measured == 96_927_744_000 and gates[2].margin == -6_927_744_000
    assert gates[2].detail == "missed by 6,927,744,000 FLOPs"
    assert gates[4].detail == "missed by 0.93 percentage points"
    assert gates[1].detail == "41,219 params to spare"

    data = json.loads(render(slim_neck_l(), "json", gates=gates))
    follows(data["gates"], [GATE])
    assert data["gates_passed"] is False
    assert data["gates"][2] | {"margin": None} == {
        "gate": "max-flops",
        "limit": "max",
        "threshold": 90_000_000_000,
        "measured": 96_927_744_000,
        "unit": "FLOPs",
        "passed": False,
        "margin": None,
        "detail": "missed by 6,927,744,000 FLOPs",
    }
    text = render(slim_neck_l(), "text", gates=gates)
    assert "FAILED: max-flops, min-flops-reduction" in text
    assert re.search(r"--max-flops\s+≤ 90,000,000,000 \(90.00 G\)\s+96,927,744,000 \(96.93 G\)\s+FAIL", text)

    nothing = slim_neck_l(sites=[], unmatched_rules=["csp-to-vovgscsp", "conv-to-gsconv"])
    no_match = GateResult("fail-on-no-match", "max", 0, 2, "rules")
    assert check_gates(nothing, fail_on_no_match=True) == [no_match]
    assert check_gates(nothing, fail_on_no_match=True)[0].detail == "2 rules matched nothing"
    assert check_gates(nothing) == []


def test_text_has_every_section_and_the_totals():
    text = render(slim_neck_l(), "text")
    for expected in [
        "rewrite plan: yolov5l with slim-neck",
        "46,563,709",
        "39,958,781",
        "-6,604,928",
        "-14.18%",
        "46.56 M → 39.96 M",
        "108,993,740,800",
        "96,927,744,000",
        "-11.07%",
        "Conv(1024→512, k1, s1) → GSConv(1024→512, k1, s1)",
        "out_channels 255 is not a multiple of 2",
        "Detect",
        "matched nothing",
        "passed: 2 outputs, shapes unchanged",
        "1×3×640×640",
    ]:
        assert expected in text, expected
    stages = text.split("Stages\n")[1].split("\n\n")[0]
    rows = [line.split()[0] for line in stages.splitlines()[3:]]
    assert rows == ["backbone", "neck", "head", "other", "total"]
    assert re.search(r"Needed real data, could not run on meta \(0\)\n-+\nnone\n", text)


def test_markdown_tables_have_a_header_row_and_a_separator():
    text = render(slim_neck_l(), "markdown", gates=check_gates(slim_neck_l(), max_flops=100_000_000_000))
    assert text.startswith("## rewrite plan: yolov5l with slim-neck\n")
    tables = markdown_tables(text)
    assert len(tables) == 6  # totals, gates, stages, sites, rejected, leaves
    for table in tables:
        header, separator, *rows = table
        assert rows and re.fullmatch(r"\|( *:?-+:? *\|)+", separator), table
        assert header.count("|") == separator.count("|") == rows[0].count("|")
    assert "| params |" in text and "46,563,709" in text and "### Rewritten sites (2)" in text
    assert re.search(r"\|\s+-11\.07% \|", text)  # numbers right-aligned (":|" separators)


def test_markdown_escapes_what_github_would_interpret():
    hostile = slim_neck_l(rejected=[Rejection("model.1", "r|x", "expected <class 'Tensor'> | *bold*")])
    text = render(hostile, "markdown")
    row = next(line for line in text.splitlines() if line.startswith("| model.1 "))
    assert r"r\|x" in row and "&lt;class 'Tensor'&gt; \\| \\*bold\\*" in row
    assert row.count("|") - row.count("\\|") == 4  # three cells, the pipes inside them escaped


def test_html_is_one_self_contained_file_with_charts():
    page = render(slim_neck_l(), "html", gates=check_gates(slim_neck_l(), min_flops_reduction=10))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<svg") == 2 and "params per stage" in page and "FLOPs per stage" in page
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page
    finder = ResourceFinder()
    finder.feed(page)
    assert finder.found == []
    assert "46,563,709" in page and "<table>" in page and "-11.07%" in page
    # One bar per stage and state (before, after) for every stage that has params or FLOPs ("other" has none).
    assert page.count("<rect") == 2 * (2 + 3 * 2)  # per chart: two legend squares, three stages × two bars


def test_html_reads_at_a_glance():
    failing = render(slim_neck_l(), "html", gates=check_gates(slim_neck_l(), min_flops_reduction=12.0))
    # A failed gate is a red banner above everything else, saying which gate and by how much.
    banner = re.search(r'<div class="alert bad" role="alert">(.*?)</div>', failing).group(1)
    assert failing.index(banner) < failing.index("<h2>")
    assert "1 of 1 gate failed" in banner and "--min-flops-reduction" in banner
    assert "missed by 0.93 percentage points" in banner
    assert (
        '<dd class="bad">FAILED: min-flops-reduction</dd>' in failing
        and '<td class="bad">FAIL</td>' in failing
    )
    passing = render(slim_neck_l(), "html", gates=check_gates(slim_neck_l(), min_flops_reduction=10))
    assert 'class="alert ok"' in passing and "All 1 gate passed" in passing and "alert bad" not in passing
    assert '<div class="alert' not in render(slim_neck_l(), "html")  # no gates, nothing to announce
    broken = render(slim_neck_l(shape_check=ShapeCheck(False, "output 0 was 1×255, now 1×254")), "html")
    assert "Shape check failed" in broken and "output 0 was 1×255, now 1×254" in broken

    # The two "Δ %" columns sit under "params" and "FLOPs" group headers.
    assert '<th colspan="4" class="group">params</th><th colspan="4" class="group">FLOPs</th>' in failing
    assert '<th rowspan="2">stage</th>' in failing and failing.count('<th class="num">Δ %</th>') == 4
    # A rewrite breaks at its arrow, never inside a signature; a long path breaks after a dot.
    assert (
        '<td class="pair"><span>Conv(1024→512, k1, s1) →</span> <span>GSConv(1024→512, k1, s1)</span>'
        in failing
    )
    long_path = slim_neck_l(leaves=[Leaf("model.backbone.body.layer4.2.downsample.0", "Conv2d", "x")])
    assert "model.backbone.<wbr>body.layer4.<wbr>2.downsample.0" in render(long_path, "html")

    # Bars grow from one drawn zero line; a stage that grew is red, and the legend says what red means.
    assert failing.count("<line") == 2 and "after, grew" not in failing
    grown = slim_neck_l(
        stages={"neck": StageChange(Delta(19_000_000, 12_395_072), Delta(48_000_000_000, 50_000_000_000))}
    )
    chart = render(grown, "html").split("FLOPs per stage</text>")[1]
    assert "after, grew" in chart and 'fill="#cf222e">50.00 G (+4.17%)' in chart
    # A long stage name widens the label column (up to a limit) instead of running into the bars.
    named = slim_neck_l(stages={"a-very-long-stage": StageChange(Delta(10, 5), Delta(100, 50))})
    assert '<rect x="131" y="46"' in render(named, "html")
    huge = slim_neck_l(stages={"s" * 60: StageChange(Delta(10, 5), Delta(100, 50))})
    assert f"<title>{'s' * 60}</title>{'s' * 25}…</text>" in render(huge, "html")


def test_html_escapes_everything_user_controlled():
    attack = "<script>alert(1)</script>"
    hostile = slim_neck_l(
        model_name=attack,
        rule_set='"><img src=x onerror=alert(2)>',
        sites=[
            SiteChange(
                "model.<b>", "r&d", "neck<i>", "module", "A<x>", "B</td>", Delta(10, 5), Delta(100, 50)
            )
        ],
        stages={"<svg onload=alert(3)>": StageChange(Delta(10, 5), Delta(100, 50))},
        warnings=["<iframe src=//evil>"],
    )
    page = render(hostile, "html")
    for raw in [attack, "<img", "<b>", "<i>", "<x>", "B</td>", "<iframe", "<svg onload", "r&d"]:
        assert raw not in page, raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "r&amp;d" in page
    finder = ResourceFinder()
    finder.feed(page)
    assert finder.found == []


def test_profile_renders_in_every_format():
    stages = {"backbone": Cost(900, 6_000), "neck": Cost(90, 3_000), "head": Cost(10, 1_000)}
    modules = {
        "": Cost(1_000, 10_000),
        "model": Cost(1_000, 10_000),
        "model.0": Cost(900, 6_000),
        "model.0.conv": Cost(900, 6_000),
        "model.1": Cost(90, 3_000),
        "model.2": Cost(10, 1_000),
    }
    needed = [Leaf("model.2", "Detect", "nonzero on meta")]
    prof = Profile(Cost(1_000, 10_000), modules, stages, "meta", needed)
    shapes = [(1, 3, 64, 64)]
    out = {fmt: render_profile(prof, fmt, model_name="tiny", input_shapes=shapes) for fmt in FORMATS}

    data = json.loads(out["json"])
    follows(data, PROFILE_SCHEMA)
    assert data["report"] == "profile" and data["totals"] == {"params": 1_000, "flops": 10_000, "macs": 5_000}
    # The wrapper "model" is skipped: its one child would say nothing.
    assert [m["path"] for m in data["modules"]] == ["model.0", "model.1", "model.2"]
    assert data["stages"]["neck"] == {"params": 90, "flops": 3_000, "macs": 1_500}
    assert "10,000" in out["text"] and "60.0%" in out["text"] and "nonzero on meta" in out["text"]
    assert all(len(table) >= 3 for table in markdown_tables(out["markdown"]))
    assert out["html"].count("<svg") == 2 and "https://" not in out["html"]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="expected one of text, markdown, json, html"):
        render(slim_neck_l(), "yaml")


def test_a_real_plan_renders_in_every_format():
    with torch.device("meta"):
        model = create_model("yolov5n").eval()
    real = plan(model, "slim-neck", (torch.empty(1, 3, 64, 64, device="meta"),), model_name="yolov5n")
    data = json.loads(render(real, "json"))
    follows(data, PLAN_SCHEMA)
    assert len(data["sites"]) == 8 and data["totals"]["params"]["after"] == 1_669_693
    for what in ("params", "flops"):  # stage subtotals add up to the totals
        for state in ("before", "after"):
            assert sum(s[what][state] for s in data["stages"].values()) == data["totals"][what][state]
    assert "1,872,157" in render(real, "text") and markdown_tables(render(real, "markdown"))
    assert "<svg" in render(real, "html")
