"""rewrite: torch.fx model surgery with declarative rules, and a params/FLOPs diff report.

The pipeline reads in the order of its modules — :mod:`~rewrite.tracer` → :mod:`~rewrite.graph` →
:mod:`~rewrite.match` → :mod:`~rewrite.rewriter` → :mod:`~rewrite.report` — and :mod:`~rewrite.planner` chains
them behind two calls:

>>> import torch, rewrite
>>> from rewrite.zoo import create_model
>>> model = create_model("yolov5n").eval()
>>> plan = rewrite.plan(model, "slim-neck", torch.zeros(1, 3, 640, 640))   # a dry run: model untouched
>>> plan.params.before, plan.params.after
(1872157, 1669693)
>>> slim = plan.apply()                                                    # the rewritten copy
>>> print(rewrite.render(plan, "markdown").splitlines()[0])
## rewrite plan: DetectionModel with slim-neck

To deploy: :func:`fold` (an inference copy with BatchNorms and channel shuffles folded away), :func:`save` /
:func:`load` (a recipe and safetensors weights, no pickles) and :func:`export_onnx`.
"""

import warnings

# Importing torch.fx sets up a tensor subclass through torch's NumPy bridge, which warns when NumPy is missing;
# this library never converts to NumPy, and its core install does not bring it: the warning would only alarm.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch.fx  # noqa: F401

from rewrite.blocks import GSBottleneck, GSConv, VoVGSCSP
from rewrite.builders import register_builder
from rewrite.errors import (
    BuildError,
    ExportError,
    InputSpecError,
    ModelSpecError,
    NoMatchError,
    NoMatchWarning,
    RecipeError,
    RewriteError,
    RuleError,
    ScopeError,
    ShapeCheckError,
    TraceError,
)
from rewrite.export import export_onnx
from rewrite.fold import fold
from rewrite.gates import GateResult, check_gates
from rewrite.graph import label_stages, resolve_scope, resolve_stages, to_networkx
from rewrite.planner import Plan, apply, plan
from rewrite.profiler import Cost, Profile, profile
from rewrite.report import render, render_profile
from rewrite.rules import RuleSet, builtin_rule_sets, load_rules, parse_rules
from rewrite.serialization import load, save
from rewrite.site import Site
from rewrite.tracer import Leaf, Traced, trace
from rewrite.warm_start import SiteFit, WarmStartReport, warm_start

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "Cost",
    "ExportError",
    "GSBottleneck",
    "GSConv",
    "GateResult",
    "InputSpecError",
    "Leaf",
    "ModelSpecError",
    "NoMatchError",
    "NoMatchWarning",
    "Plan",
    "Profile",
    "RecipeError",
    "RewriteError",
    "RuleError",
    "RuleSet",
    "ScopeError",
    "ShapeCheckError",
    "Site",
    "SiteFit",
    "TraceError",
    "Traced",
    "VoVGSCSP",
    "WarmStartReport",
    "apply",
    "builtin_rule_sets",
    "check_gates",
    "export_onnx",
    "fold",
    "label_stages",
    "load",
    "load_rules",
    "parse_rules",
    "plan",
    "profile",
    "register_builder",
    "render",
    "render_profile",
    "resolve_scope",
    "resolve_stages",
    "save",
    "to_networkx",
    "trace",
    "warm_start",
]
