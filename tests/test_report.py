"""rewrite.report: every format of a plan (and a profile) parses, carries the figures and is safe to open."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import torch
from html_page import Element, parse_html
from plans import FIVE_GATES, slim_neck_l
from reference import BASE, SLIM_NECK

from rewrite.gates import check_gates
from rewrite.planner import BlockSummary, Delta, Plan, Rejection, ShapeCheck, SiteChange, StageChange, plan
from rewrite.profiler import Cost, Profile
from rewrite.report import FORMATS, JSON_SCHEMA_VERSION, render, render_profile
from rewrite.tracer import Leaf
from rewrite.zoo import create_model

# docs/report-schema.md, as types: a dict is a nested object, a list [T] an array of T.
DELTA = {"before": int, "after": int, "change": int, "percent": float}
LEAF = {"path": str, "type_name": str, "reason": str}
OPTIONAL_SPATIAL = (int, list, type(None))
BLOCK = {
    "type_name": str,
    "in_channels": (int, type(None)),
    "out_channels": (int, type(None)),
    "kernel_size": OPTIONAL_SPATIAL,
    "stride": OPTIONAL_SPATIAL,
    "n": (int, type(None)),
}
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
            "replaced": BLOCK,
            "replacement": BLOCK,
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


def section_table(page: Element, title_start: str) -> Element:
    """The table under the ``<h2>`` whose title starts with ``title_start``."""
    body = page.find("body").elements()
    heading = next(i for i, e in enumerate(body) if e.tag == "h2" and e.text().startswith(title_start))
    return body[heading + 1].find("table")


def read_table(table: Element) -> list[dict[str, str]]:
    """A table's body rows as a reader sees them: ``{column: text}``, whitespace collapsed; a column under a
    group header is named by both ("params Δ %")."""
    head = table.find("thead").find_all("tr")
    names = [th.text() for th in head[0].find_all("th")]
    if len(head) == 2:  # a group header spans the columns beneath it; a column of its own spans both rows
        below = iter(th.text() for th in head[1].find_all("th"))
        names = []
        for th in head[0].find_all("th"):
            if th.attrs.get("rowspan") == "2":
                names.append(th.text())
            else:
                names += [f"{th.text()} {next(below)}" for _ in range(int(th.attrs.get("colspan") or 1))]
    return [
        dict(zip(names, (" ".join(td.text().split()) for td in row.find_all("td")), strict=True))
        for row in table.find("tbody").find_all("tr")
    ]


def facts(page: Element) -> dict[str, Element]:
    """The facts under the title: each label's value element."""
    items = page.find("dl").elements()
    return {dt.text(): dd for dt, dd in zip(items[::2], items[1::2], strict=True)}


def banners(page: Element) -> list[Element]:
    """The messages a reader is shown first: what assistive technology announces (role alert or status)."""
    return [div for div in page.find_all("div") if div.attrs.get("role") in ("alert", "status")]


def chart(page: Element, title: str) -> Element:
    return next(svg for svg in page.find_all("svg") if svg.find("title").text() == title)


def labelled_rects(svg: Element) -> dict[str, Element]:
    """A chart's squares and bars by the text drawn right after each: "before", "after" … for the legend's
    squares, the value ("48.00 G (-25.00%)") for a bar."""
    shapes = svg.elements()
    return {
        shapes[i + 1].text(): shape
        for i, shape in enumerate(shapes[:-1])
        if shape.tag == "rect" and shapes[i + 1].tag == "text"
    }


LEGEND = {"before", "after", "after, grew"}


def bars(svg: Element) -> dict[str, Element]:
    """A chart's bars by the value written beside each."""
    return {text: rect for text, rect in labelled_rects(svg).items() if text not in LEGEND}


def test_json_follows_the_schema_and_carries_the_figures():
    data = json.loads(render(slim_neck_l(), "json"))
    follows(data, PLAN_SCHEMA)
    assert data["schema_version"] == JSON_SCHEMA_VERSION == 1 and data["report"] == "plan"
    assert data["totals"]["params"] == {
        "before": BASE["yolov5l"][0],
        "after": SLIM_NECK["yolov5l"][0],
        "change": -6_604_928,
        "percent": -14.1847,
    }
    assert data["totals"]["flops"]["percent"] == -11.0704
    assert list(data["stages"]) == ["backbone", "neck", "head", "other"]
    follows(data["stages"]["neck"], {"params": DELTA, "flops": DELTA})
    assert [site["path"] for site in data["sites"]] == ["model.10", "model.13"]
    conv, csp = data["sites"]
    assert (conv["before"], conv["after"]) == ("Conv(1024→512, k1, s1)", "GSConv(1024→512, k1, s1)")
    assert conv["replaced"] == {
        "type_name": "Conv",
        "in_channels": 1024,
        "out_channels": 512,
        "kernel_size": 1,
        "stride": 1,
        "n": None,
    }
    assert csp["after"] == "VoVGSCSP(1024→512, s1, n=3)"
    assert (csp["replacement"]["type_name"], csp["replacement"]["n"]) == ("VoVGSCSP", 3)
    assert data["input_shapes"] == [[1, 3, 640, 640]]
    assert "gates" not in data and "gates_passed" not in data  # only when gates ran
    assert render(slim_neck_l(), "json") == render(slim_neck_l(), "json")  # stable for CI diffs


def test_gates_render_with_their_margins():
    gates = check_gates(slim_neck_l(), **FIVE_GATES)
    data = json.loads(render(slim_neck_l(), "json", gates=gates))
    follows(data["gates"], [GATE])
    assert data["gates_passed"] is False
    assert data["gates"][2] | {"margin": None} == {
        "gate": "max-flops",
        "limit": "max",
        "threshold": 90_000_000_000,
        "measured": SLIM_NECK["yolov5l"][1],
        "unit": "FLOPs",
        "passed": False,
        "margin": None,
        "detail": "missed by 6,927,744,000 FLOPs",
    }
    text = render(slim_neck_l(), "text", gates=gates)
    assert "FAILED: max-flops, min-flops-reduction" in text
    assert re.search(
        r"(?m)^max-flops\s+≤ 90,000,000,000 \(90.00 G\)\s+96,927,744,000 \(96.93 G\)\s+FAIL", text
    )


def test_text_has_every_section_and_the_totals():
    text = render(slim_neck_l(), "text")
    for expected in [
        "rewrite plan: yolov5l with slim-neck",
        f"{BASE['yolov5l'][0]:,}",
        f"{SLIM_NECK['yolov5l'][0]:,}",
        "-6,604,928",
        "-14.18%",
        "46.56 M → 39.96 M",
        f"{BASE['yolov5l'][1]:,}",
        f"{SLIM_NECK['yolov5l'][1]:,}",
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
    assert "| params |" in text and f"{BASE['yolov5l'][0]:,}" in text and "### Rewritten sites (2)" in text
    assert re.search(r"\|\s+-11\.07% \|", text)  # numbers right-aligned (":|" separators)


def test_markdown_escapes_what_github_would_interpret():
    hostile = slim_neck_l(rejected=[Rejection("model.1", "r|x", "expected <class 'Tensor'> | *bold*")])
    text = render(hostile, "markdown")
    row = next(line for line in text.splitlines() if line.startswith("| model.1 "))
    assert r"r\|x" in row and "&lt;class 'Tensor'&gt; \\| \\*bold\\*" in row
    assert row.count("|") - row.count("\\|") == 4  # three cells, the pipes inside them escaped


def test_gates_go_by_their_own_names_unless_the_caller_names_them():
    # From Python a gate is check_gates' name for it; the rewrite command names its option instead.
    gates = check_gates(slim_neck_l(), max_flops=90_000_000_000)
    for fmt in ("text", "markdown", "html"):
        assert "--max-flops" not in render(slim_neck_l(), fmt, gates=gates)
        as_option = render(slim_neck_l(), fmt, gates=gates, gate_label=lambda gate: f"--{gate}")
        assert "--max-flops" in as_option
    page = parse_html(render(slim_neck_l(), "html", gates=gates, gate_label=lambda gate: f"--{gate}"))
    [row] = read_table(section_table(page, "Gates"))
    assert row["gate"] == "--max-flops" and row["result"] == "FAIL"
    assert banners(page)[0].text().count("--max-flops: needs ≤ 90,000,000,000 (90.00 G)") == 1
    # The JSON holds the name, whatever people's formats call it.
    named = render(slim_neck_l(), "json", gates=gates, gate_label=lambda gate: f"--{gate}")
    assert named == render(slim_neck_l(), "json", gates=gates)
    assert json.loads(named)["gates"][0]["gate"] == "max-flops"


def test_every_format_carries_the_same_figures():
    # One document: the JSON's records and people's tables are the same rows.
    gates = check_gates(slim_neck_l(), max_params=40_000_000, min_flops_reduction=12.0)
    data = json.loads(render(slim_neck_l(), "json", gates=gates))
    page = parse_html(render(slim_neck_l(), "html", gates=gates))
    text = render(slim_neck_l(), "text", gates=gates)
    sites = read_table(section_table(page, "Rewritten sites"))
    assert [row["path"] for row in sites] == [site["path"] for site in data["sites"]]
    for row, site in zip(sites, data["sites"], strict=True):
        assert row["change"] == f"{site['before']} → {site['after']}" and row["change"] in text
        assert row["params before"] == f"{site['params']['before']:,}"
        assert row["FLOPs Δ"] == f"{site['flops']['change']:+,}"
        assert row["FLOPs Δ %"] == f"{site['flops']['percent']:+.2f}%"
    stages = read_table(section_table(page, "Stages"))
    assert [row["stage"] for row in stages] == [*data["stages"], "total"]  # the total is people's alone
    for row, (name, stage) in zip(stages, data["stages"].items()):
        assert row["params after"] == f"{stage['params']['after']:,}", name
    gate_rows = read_table(section_table(page, "Gates"))
    assert [(row["gate"], row["result"]) for row in gate_rows] == [
        (gate["gate"], "pass" if gate["passed"] else "FAIL") for gate in data["gates"]
    ]
    assert [row["reason"] for row in read_table(section_table(page, "Rejected"))] == [
        rejected["reason"] for rejected in data["rejected"]
    ]
    assert facts(page)["input"].text() == "1×3×640×640" and data["input_shapes"] == [[1, 3, 640, 640]]


def test_html_is_one_self_contained_file_with_charts():
    page = render(slim_neck_l(), "html", gates=check_gates(slim_neck_l(), min_flops_reduction=10))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page
    finder = ResourceFinder()
    finder.feed(page)
    assert finder.found == []
    tree = parse_html(page)
    assert [svg.find("title").text() for svg in tree.find_all("svg")] == [
        "params per stage",
        "FLOPs per stage",
    ]
    assert tree.find_all("table") and f"{BASE['yolov5l'][0]:,}" in tree.text() and "-11.07%" in tree.text()
    # A bar per stage and state, labelled with its value (and the after's change), for every stage that has
    # params or FLOPs ("other" has none); every bar grows from the same zero.
    flops = chart(tree, "FLOPs per stage")
    labels = [text.text() for text in flops.find_all("text")]
    assert {"backbone", "neck", "head"} <= set(labels) and "other" not in labels
    assert set(bars(flops)) == {
        "60.00 G",
        "60.00 G (0.00%)",
        "48.00 G",
        "35.93 G (-25.14%)",
        "993.74 M",
        "993.74 M (0.00%)",
    }
    for svg in tree.find_all("svg"):
        assert len({rect.attrs["x"] for rect in bars(svg).values()}) == 1


def test_html_puts_what_failed_first():
    failing = parse_html(
        render(slim_neck_l(), "html", gates=check_gates(slim_neck_l(), min_flops_reduction=12.0))
    )
    # A failed gate is announced above everything else, saying which gate and by how much.
    body = failing.find("body").elements()
    [banner] = banners(failing)
    assert banner.attrs["role"] == "alert"
    assert body.index(banner) < min(i for i, e in enumerate(body) if e.tag == "h2")
    assert "1 of 1 gate failed" in banner.text() and "min-flops-reduction" in banner.text()
    assert "missed by 0.93 percentage points" in banner.text()
    verdicts = facts(failing)
    assert verdicts["gates"].text() == "FAILED: min-flops-reduction"
    # Verdicts are marked (coloured) by their outcome; other facts are not.
    assert verdicts["gates"].attrs != verdicts["shape check"].attrs and verdicts["model"].attrs == {}
    [gate] = read_table(section_table(failing, "Gates"))
    assert gate["result"] == "FAIL" and gate["measured"] == "11.07%" and gate["threshold"] == "≥ 12.00%"

    passing = parse_html(
        render(slim_neck_l(), "html", gates=check_gates(slim_neck_l(), min_flops_reduction=10))
    )
    [banner] = banners(passing)
    assert banner.attrs["role"] == "status" and "All 1 gate passed" in banner.text()
    assert facts(passing)["gates"].attrs == facts(passing)["shape check"].attrs  # both passed
    assert banners(parse_html(render(slim_neck_l(), "html"))) == []  # no gates, nothing to say
    broken = slim_neck_l(shape_check=ShapeCheck(False, "output 0 was 1×255, now 1×254"))
    [banner] = banners(parse_html(render(broken, "html")))
    assert banner.attrs["role"] == "alert"
    assert "Shape check failed" in banner.text() and "output 0 was 1×255, now 1×254" in banner.text()


def test_html_tables_read_like_the_text_ones():
    page = parse_html(render(slim_neck_l(), "html"))
    # The two "Δ %" columns sit under "params" and "FLOPs" headers.
    neck = read_table(section_table(page, "Stages"))[1]
    assert neck == {
        "stage": "neck",
        "params before": "19,000,000",
        "params after": "12,395,072",
        "params Δ": "-6,604,928",
        "params Δ %": "-34.76%",
        "FLOPs before": "48,000,000,000",
        "FLOPs after": "35,934,003,200",
        "FLOPs Δ": "-12,065,996,800",
        "FLOPs Δ %": "-25.14%",
    }
    [first, _] = read_table(section_table(page, "Rewritten sites"))
    assert first["change"] == "Conv(1024→512, k1, s1) → GSConv(1024→512, k1, s1)"
    # A long path may break across lines, but reads whole.
    long_path = slim_neck_l(leaves=[Leaf("model.backbone.body.layer4.2.downsample.0", "Conv2d", "x")])
    [leaf] = read_table(section_table(parse_html(render(long_path, "html")), "Leaves"))
    assert leaf == {"path": "model.backbone.body.layer4.2.downsample.0", "type": "Conv2d", "reason": "x"}
    assert (
        read_table(
            section_table(parse_html(render(slim_neck_l(leaves=[Leaf("", "M", "y")]), "html")), "Leaves")
        )[0]["path"]
        == "(root)"
    )


def test_html_charts_say_what_grew():
    # A stage that grew is red, and the legend says what red means.
    assert "after, grew" not in labelled_rects(
        chart(parse_html(render(slim_neck_l(), "html")), "FLOPs per stage")
    )
    grown = slim_neck_l(
        stages={"neck": StageChange(Delta(19_000_000, 12_395_072), Delta(48_000_000_000, 50_000_000_000))}
    )
    flops = chart(parse_html(render(grown, "html")), "FLOPs per stage")
    squares = labelled_rects(flops)
    grew = squares["after, grew"].attrs["fill"]
    assert squares["50.00 G (+4.17%)"].attrs["fill"] == grew != squares["after"].attrs["fill"]
    value = next(text for text in flops.find_all("text") if text.text() == "50.00 G (+4.17%)")
    assert value.attrs["fill"] == grew
    params = chart(parse_html(render(grown, "html")), "params per stage")
    assert "after, grew" not in labelled_rects(params)  # the neck's params shrank

    # A long stage name widens the label column (up to a limit) instead of running into the bars.
    def bars_start(plan: Plan) -> float:
        squares = labelled_rects(chart(parse_html(render(plan, "html")), "FLOPs per stage"))
        return float(squares["before"].attrs["x"])  # the legend starts where the bars do

    named = slim_neck_l(stages={"a-very-long-stage": StageChange(Delta(10, 5), Delta(100, 50))})
    huge = slim_neck_l(stages={"s" * 60: StageChange(Delta(10, 5), Delta(100, 50))})
    assert bars_start(slim_neck_l()) < bars_start(named) < bars_start(huge)
    assert "a-very-long-stage" in [
        t.text() for t in chart(parse_html(render(named, "html")), "FLOPs per stage").find_all("text")
    ]
    # Past the limit the name is cut, and whole in a tooltip.
    labels = chart(parse_html(render(huge, "html")), "FLOPs per stage").find_all("text")
    label = next(text for text in labels if text.find_all("title"))
    assert label.find("title").text() == "s" * 60
    shown = label.own_text()
    assert shown.endswith("…") and ("s" * 60).startswith(shown[:-1]) and len(shown) < 60


def test_html_escapes_everything_user_controlled():
    attack = "<script>alert(1)</script>"
    hostile = slim_neck_l(
        model_name=attack,
        rule_set='"><img src=x onerror=alert(2)>',
        sites=[
            SiteChange(
                "model.<b>",
                "r&d",
                "neck<i>",
                "module",
                BlockSummary("A<x>", 3, 4, stride=1),
                BlockSummary("B</td>", 3, 4, stride=1),
                Delta(10, 5),
                Delta(100, 50),
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
    page = parse_html(out["html"])
    assert [svg.find("title").text() for svg in page.find_all("svg")] == [
        "params per stage",
        "FLOPs per stage",
    ]
    assert [row["module"] for row in read_table(section_table(page, "Top-level modules"))] == [
        "model.0",
        "model.1",
        "model.2",
    ]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="expected one of text, markdown, json, html"):
        render(slim_neck_l(), "yaml")


def test_a_real_plan_renders_in_every_format():
    with torch.device("meta"):
        model = create_model("yolov5n").eval()
    real = plan(model, "slim-neck", (torch.empty(1, 3, 64, 64, device="meta"),), model_name="yolov5n")
    data = json.loads(render(real, "json"))
    follows(data, PLAN_SCHEMA)
    assert len(data["sites"]) == 8 and data["totals"]["params"]["after"] == SLIM_NECK["yolov5n"][0]
    for what in ("params", "flops"):  # stage subtotals add up to the totals
        for state in ("before", "after"):
            assert sum(s[what][state] for s in data["stages"].values()) == data["totals"][what][state]
    assert f"{BASE['yolov5n'][0]:,}" in render(real, "text") and markdown_tables(render(real, "markdown"))
    assert "<svg" in render(real, "html")
