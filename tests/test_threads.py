"""trace / profile / plan from several threads at once give the figures of a run alone (issue: threads)."""

from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision

import rewrite
from rewrite.zoo import create_model


def figures(model: torch.nn.Module, rules: str | None) -> tuple:
    x = torch.zeros(1, 3, 64, 64)
    if rules is None:
        profile = rewrite.profile(model, x)
        return profile.total.params, profile.total.flops
    plan = rewrite.plan(model, rules, x)
    return plan.params.after, plan.flops.after, tuple(site.path for site in plan.sites)


def test_concurrent_plans_and_profiles_match_sequential_runs():
    yolo, resnet = create_model("yolov5n").eval(), torchvision.models.resnet18(weights=None).eval()
    jobs = [(yolo, "slim-neck"), (resnet, None), (yolo, None), (yolo, "gsconv-only")] * 2
    alone = [figures(model, rules) for model, rules in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: figures(*job), jobs))
    assert together == alone
