"""trace / profile / plan from several threads at once give the figures of a run alone (issue: threads)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision
from reference import SLIM_NECK

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


def test_a_model_planned_in_one_thread_runs_unchanged_in_another():
    model = create_model("yolov5n").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)[0]
    stop, outcomes = threading.Event(), []

    def infer() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    outcomes.append(torch.equal(model(x)[0], expected))
            except Exception as error:  # noqa: BLE001 -- what the test counts
                outcomes.append(error)

    runner = threading.Thread(target=infer)
    runner.start()
    try:
        plans = [rewrite.plan(model, "slim-neck", torch.zeros(1, 3, 64, 64)) for _ in range(3)]
    finally:
        stop.set()
        runner.join()
    assert outcomes and all(outcome is True for outcome in outcomes), [o for o in outcomes if o is not True][
        :3
    ]
    assert {(p.params.after, p.flops.after) for p in plans} == {(SLIM_NECK["yolov5n"][0], 41_449_472)}
