"""The public entry points: ``plan()`` (a dry run) and ``apply()`` (the rewritten copy).

``plan`` chains the pipeline — trace, graph, match, rewrite (on a weight-free copy), profile — and returns a
:class:`Plan`: plain data that :mod:`rewrite.report` renders and ``Plan.apply()`` turns into the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewrite.errors import BuildError, NoMatchError, NoMatchWarning, RewriteError, ShapeCheckError
from rewrite.execution import (
    RunFailed,
    full_collections_deferred,
    model_lock,
    run,
    working_copy,
)
from rewrite.graph import Scope, StageMap, resolve_scope, resolve_stages
from rewrite.match import Kind, Match, MatchResult, Rejection, find_matches
from rewrite.profiler import Cost, Profile, profile, profile_and_outputs
from rewrite.rewriter import (
    BuiltSite,
    ShapeCheck,
    absorb_into_graph_regions,
    build_sites,
    check_outputs,
    refuse_frozen,
    rewrite_model,
    site_module,
    site_module_paths,
)
from rewrite.rules import RuleSet, load_rules
from rewrite.signature import module_signature
from rewrite.site import Site
from rewrite.tracer import Leaf, Traced, trace

__all__ = [
    "BlockSummary",
    "Delta",
    "Plan",
    "Rejection",
    "ShapeCheck",
    "SiteChange",
    "StageChange",
    "apply",
    "plan",
]


@dataclass(frozen=True)
class Delta:
    """A figure before and after the rewrite.

    >>> Delta(200, 150).change, Delta(200, 150).percent
    (-50, -25.0)
    """

    before: int
    after: int

    @property
    def change(self) -> int:
        return self.after - self.before

    @property
    def percent(self) -> float:
        return 100.0 * self.change / self.before if self.before else 0.0


@dataclass(frozen=True)
class BlockSummary:
    """The figures of a replaced or replacing block that a reader checks first; ``str()`` spells them as the
    reports do.

    >>> str(BlockSummary("Conv", 1024, 512, stride=1, kernel_size=1))
    'Conv(1024→512, k1, s1)'
    >>> str(BlockSummary("VoVGSCSP", 1024, 1024, stride=1, n=3))
    'VoVGSCSP(1024→1024, s1, n=3)'
    """

    type_name: str
    in_channels: int | None
    out_channels: int | None
    stride: int | tuple[int, ...] | None
    # Conv sites only: the first inner conv of a block (a C3) says nothing about the block.
    kernel_size: int | tuple[int, ...] | None = None
    n: int | None = None  # the replacement's number of inner blocks, when its rule sets one

    def __str__(self) -> str:
        parts = [f"{self.in_channels}→{self.out_channels}"]
        if self.kernel_size is not None:
            parts.append(f"k{self.kernel_size}")
        parts.append(f"s{self.stride}")
        if self.n is not None:
            parts.append(f"n={self.n}")
        return f"{self.type_name}({', '.join(parts)})"


@dataclass(frozen=True)
class SiteChange:
    """One rewritten site: what was there, what replaces it, and what that costs."""

    path: str  # module path of the replaced module call (graph rewrites: the module of the site's first op)
    rule: str
    stage: str | None
    kind: Kind  # how it was rewritten (see rewrite.match.Match); equal to its word: "module", "modules", "graph"
    replaced: BlockSummary
    replacement: BlockSummary
    params: Delta
    flops: Delta  # of every call the site's new block serves
    calls: int = 1  # how many calls of the old modules one new block now serves (kept shared)
    untied: str = ""  # set when the site's old modules were shared and its new block is not
    # MODULE / MODULES sites: the paths of the modules whose calls the new block replaces, in call order
    # (the first becomes the block; the others nn.Identity, but a trailing shared activation that stays).
    modules: tuple[str, ...] = ()

    @property
    def before(self) -> str:
        """What was there, e.g. ``"Conv(1024→512, k1, s1)"``."""
        return str(self.replaced)

    @property
    def after(self) -> str:
        """What replaces it, e.g. ``"GSConv(1024→512, k1, s1)"``."""
        return str(self.replacement)


@dataclass(frozen=True)
class StageChange:
    params: Delta
    flops: Delta


@dataclass
class Plan:
    """What a rewrite would do to a model, measured on a copy; the user's model is never touched.

    ``apply()`` returns the rewritten copy.
    """

    model_name: str
    rule_set: str
    scope: str
    input_shapes: list[tuple[int, ...]]
    device: str
    sites: list[SiteChange]
    rejected: list[Rejection]
    leaves: list[Leaf]
    warnings: list[str]
    params: Delta
    flops: Delta
    stages: dict[str, StageChange]
    shape_check: ShapeCheck
    needed_real_data: list[Leaf] = field(default_factory=list)
    unmatched_rules: list[str] = field(default_factory=list)  # rules whose match caught nothing in scope
    _prepared: _Prepared | None = field(default=None, repr=False, compare=False)

    @property
    def nothing_rewritten(self) -> str | None:
        """Why the plan rewrites nothing, on one line; ``None`` when it rewrites some site."""
        if self.sites:
            return None
        if self.rejected:
            first = self.rejected[0]
            return (
                f"nothing rewritten: every candidate was rejected ({len(self.rejected)};"
                f" first: {first.path or '(root)'} by '{first.rule}': {first.reason})"
            )
        rules = ", ".join(f"'{name}'" for name in self.unmatched_rules) or "the rules"
        return f"nothing rewritten: {rules} matched nothing in {self.scope}"

    def apply(self) -> nn.Module:
        """The rewritten model: a copy (new blocks freshly initialised), its outputs' shapes checked.

        The copy's weights live where the planned model's do: a model built on meta gives a weight-free copy.

        Raises :class:`~rewrite.errors.ShapeCheckError` naming the site when the outputs do not line up.
        """
        if self._prepared is None:
            raise RewriteError("this plan was not made by rewrite.plan(); it holds nothing to apply")
        prepared = self._prepared
        # The new blocks draw their initial weights from a fork: the caller's random numbers stay as they were.
        with model_lock(prepared.model), torch.random.fork_rng(_cuda_devices(prepared.model)):
            return self._apply(prepared)

    def _apply(self, prepared: _Prepared) -> nn.Module:
        changed = _structure_change(prepared.structure, _structure(prepared.source))
        if changed:
            raise RewriteError(
                f"{self.model_name} changed after it was planned ({changed}); plan it again before applying"
            )
        if prepared.model is not prepared.source:  # the copy shares the parameters; buffers as they are now
            with torch.no_grad():
                for mine, theirs in zip(prepared.model.buffers(), prepared.source.buffers(), strict=True):
                    mine.copy_(theirs)
        built = build_sites(prepared.model, prepared.matches)
        rewritten = rewrite_model(prepared.model, prepared.traced, built)
        check = check_outputs(
            prepared.model, rewritten, prepared.example_inputs, other_mode=_touches_forward_code(built)
        )
        if not check.passed:
            raise ShapeCheckError(f"{self.model_name}: {check.detail}")
        return rewritten


@dataclass
class _Prepared:
    """What ``Plan.apply()`` needs to redo the rewrite on real weights (kept out of reports)."""

    model: nn.Module
    traced: Traced
    matches: list[Match]
    example_inputs: tuple
    rule_set: RuleSet  # with the scope the caller asked for, what rewrite.save records to redo the rewrite
    scope: str | Sequence[str] | None
    source: nn.Module  # the user's model; ``model`` is its working copy (rewrite.execution.working_copy)
    structure: dict[str, tuple[str, int, tuple]]  # the source's modules when planned, see _structure


def plan(
    model: nn.Module,
    rules: str | Path | RuleSet,
    example_inputs: Any,
    *,
    scope: str | Sequence[str] | None = None,
    model_name: str | None = None,
    strict: bool = False,
    allow_frozen: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Work out what ``rules`` would do to ``model`` and measure it, without touching ``model``.

    ``rules`` is a built-in rule-set name (``"slim-neck"``), a path to a TOML file, or a :class:`RuleSet`;
    ``example_inputs`` is what the model's forward takes (a tensor, or a tuple of positional arguments);
    ``scope`` overrides the rule set's default scope (a stage name, module path, glob, or a list of them).
    A rule that matches nothing is a warning, or a :class:`~rewrite.errors.NoMatchError` when ``strict``.

    A site is rewritten on the modules wherever that can express it, keeping the user's ``forward``; otherwise
    in the traced graph of the module around it, which fixes that forward's Python-level decisions. When that
    forward runs other code in the other train/eval mode, the site is rejected (with why), unless
    ``allow_frozen``: then it is rewritten anyway and the plan's warnings say which code paths were frozen.

    The measuring runs on a weight-free copy on the meta device whenever the model allows it, so planning a
    large model costs little more than tracing it.

    >>> import torch
    >>> from rewrite.zoo import create_model
    >>> model = create_model("yolov5n").eval()
    >>> p = plan(model, "slim-neck", torch.zeros(1, 3, 640, 640))
    >>> p.params.before, p.params.after, p.flops.after
    (1872157, 1669693, 4144947200)
    >>> [site.path for site in p.sites][:3]
    ['model.10', 'model.13', 'model.14']
    >>> new_model = p.apply()  # the rewritten copy; ``model`` is unchanged
    """
    # Blocks built on a real device draw their initial weights: the caller's random numbers stay as they were.
    # One plan of a model at a time: its runs swap stand-ins into the model's modules.
    with model_lock(model), torch.random.fork_rng(_cuda_devices(model)), full_collections_deferred():
        request = _Request(
            load_rules(rules),
            example_inputs if isinstance(example_inputs, tuple) else (example_inputs,),
            scope,
            model_name,
            strict,
            allow_frozen,
        )
        return _plan(model, request, progress or (lambda message: None))


@dataclass(frozen=True)
class _Request:
    """What ``plan()`` was asked for."""

    rule_set: RuleSet
    inputs: tuple[Any, ...]  # positional arguments of the model's forward
    scope: str | Sequence[str] | None  # as given; None: the rule set's own
    model_name: str | None
    strict: bool
    allow_frozen: bool


@dataclass(frozen=True)
class _Matched:
    """The traced working copy and the rule set's matches in scope."""

    traced: Traced
    stages: StageMap
    scope: Scope
    found: MatchResult
    warnings: list[str]  # one per rule that matched nothing


@dataclass(frozen=True)
class _Sites:
    """The sites built and measured, and those refused on the way, with the warnings that go with them."""

    built: list[BuiltSite]
    changes: list[SiteChange]  # one per built site
    rejected: list[Rejection]
    warnings: list[str]


def _plan(source: nn.Module, request: _Request, say: Callable[[str], None]) -> Plan:
    say(f"tracing {type(source).__name__}")
    model = working_copy(source)  # everything below runs on the copy: the user's model is only read
    matched = _match(model, request, say)

    say("measuring the original")
    before, ran_before = profile_and_outputs(model, request.inputs, stages=matched.stages)
    on_meta = not before.needed_real_data

    say(f"building {len(matched.found.matches)} site(s)")
    sites = _build_sites(model, matched, request.allow_frozen, on_meta)

    say("measuring the rewritten copy")
    # A copy of the planner's own: profiled as it is, not copied once more.
    rewritten = working_copy(
        rewrite_model(model, matched.traced, sites.built, on_meta=on_meta), handed_over=True
    )
    run_inputs = _to_meta(request.inputs) if on_meta else request.inputs
    after, ran_after = profile_and_outputs(rewritten, run_inputs, stages=matched.stages)
    check = check_outputs(
        model,
        rewritten,
        request.inputs,
        other_mode=_touches_forward_code(sites.built),
        outcomes=(ran_before, ran_after),
    )

    return Plan(
        model_name=request.model_name or type(model).__name__,
        rule_set=request.rule_set.name,
        scope=matched.scope.description,
        input_shapes=[tuple(t.shape) for t in _tensors(request.inputs)],
        device="meta" if on_meta else before.device,
        sites=sites.changes,
        rejected=[*matched.found.rejected, *sites.rejected],
        leaves=list(matched.traced.leaves),
        warnings=[
            *matched.warnings,
            *_real_data_warnings(before),
            *(f"{match.path}: untied: {match.untied}" for match in matched.found.matches if match.untied),
            *sites.warnings,
        ],
        params=Delta(before.total.params, after.total.params),
        flops=Delta(before.total.flops, after.total.flops),
        stages=_stage_changes(before, after),
        shape_check=check,
        needed_real_data=list(before.needed_real_data),
        unmatched_rules=list(matched.found.unmatched_rules),
        _prepared=_Prepared(
            model,
            matched.traced,
            [site.match for site in sites.built],
            request.inputs,
            request.rule_set,
            request.scope,
            source,
            _structure(source),
        ),
    )


def _match(model: nn.Module, request: _Request, say: Callable[[str], None]) -> _Matched:
    """Trace the model, find its stages and the scope, and match the rules there.

    A rule that matches nothing is a warning (returned, and issued as a :class:`NoMatchWarning` at the caller
    of ``plan()``), or a :class:`NoMatchError` when the request is strict.
    """
    rule_set = request.rule_set
    traced = trace(model, request.inputs)
    stages = resolve_stages(model, traced)
    scope = resolve_scope(request.scope if request.scope is not None else rule_set.scope, traced, stages)

    say(f"matching {len(rule_set.rules)} rule(s) of '{rule_set.name}' in {scope.description}")
    found = find_matches(traced, rule_set, scope)
    messages = []
    for rule_name in found.unmatched_rules:
        message = f"{rule_set.source}: rule '{rule_name}' matched nothing in {scope.description}"
        if request.strict:
            raise NoMatchError(message)
        warnings.warn(message, NoMatchWarning, stacklevel=4)  # past _match, _plan and plan: at their caller
        messages.append(message)
    return _Matched(traced, stages, scope, found, messages)


def _build_sites(model: nn.Module, matched: _Matched, allow_frozen: bool, on_meta: bool) -> _Sites:
    """Build every match's block (on meta when the model runs there), refuse the sites that would freeze a
    mode-dependent forward, and measure the rest; a site whose block cannot stand in for it is rejected."""
    candidates = build_sites(model, matched.found.matches, device=torch.device("meta") if on_meta else None)
    kept, rejected, messages = refuse_frozen(matched.traced, candidates, allow_frozen)
    built, changes = [], []
    measured_alike: dict[tuple, tuple] = {}  # see _measure_site
    for candidate in absorb_into_graph_regions(kept):
        measured = _measure_site(matched.traced, candidate, matched.stages, measured_alike)
        if isinstance(measured, Rejection):  # the builder cannot reproduce this site: the others go on
            rejected.append(measured)
            continue
        built.append(candidate)
        changes.append(measured)
    return _Sites(built, changes, rejected, messages)


def _real_data_warnings(before: Profile) -> list[str]:
    """Why the figures after the rewrite may differ on other inputs, when a part of the model needed real data."""
    if not before.needed_real_data:
        return []
    parts = ", ".join(leaf.path or "(root)" for leaf in before.needed_real_data)
    message = (
        f"{parts} needed real data: the work after it depends on what the model finds in these inputs, so "
        "the rewritten copy (other weights) may do more or less of it; the per-site figures are exact"
    )
    return [message]


def _stage_changes(before: Profile, after: Profile) -> dict[str, StageChange]:
    """Each stage's figures before and after the rewrite."""
    return {
        name: StageChange(
            Delta(before.stages.get(name, _ZERO).params, after.stages.get(name, _ZERO).params),
            Delta(before.stages.get(name, _ZERO).flops, after.stages.get(name, _ZERO).flops),
        )
        for name in {**before.stages, **after.stages}  # a stage may appear or vanish; both keep the sums
    }


def apply(
    model: nn.Module,
    rules: str | Path | RuleSet,
    example_inputs: Any,
    *,
    scope: str | Sequence[str] | None = None,
    strict: bool = False,
    allow_frozen: bool = False,
) -> nn.Module:
    """Plan and apply in one step: the rewritten copy of ``model`` (``model`` itself is untouched)."""
    return plan(model, rules, example_inputs, scope=scope, strict=strict, allow_frozen=allow_frozen).apply()


_ZERO = Cost(params=0, flops=0)


def _touches_forward_code(sites: Sequence[BuiltSite]) -> bool:
    """Whether a site keeps (``modules``) or traces (``graph``) the user's forward code, whose other train/eval
    mode the shape check then runs too."""
    return any(site.match.kind is not Kind.MODULE for site in sites)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})


def _structure(model: nn.Module) -> dict[str, tuple[str, int, tuple]]:
    """Every module under every name: its class, its identity and its own weights' shapes."""
    return {
        path: (
            type(module).__name__,
            id(module),
            tuple(
                (name, tuple(t.shape))
                for name, t in [*module._parameters.items(), *module._buffers.items()]
                if t is not None
            ),
        )
        for path, module in model.named_modules(remove_duplicate=False)
    }


def _structure_change(planned: dict[str, tuple], now: dict[str, tuple]) -> str | None:
    """What differs between two structures, on one line (the first difference), or None."""
    for path in sorted(planned.keys() | now.keys()):
        before, after = planned.get(path), now.get(path)
        if before == after:
            continue
        where = path or "the root"
        if before is None:
            return f"{where} ({after[0]}) was added"
        if after is None:
            return f"{where} ({before[0]}) was removed"
        if before[0] != after[0] or before[1] != after[1]:
            return f"{where} is now {after[0]}, was {before[0]}"
        return f"the weights of {where} changed shape"
    return None


def _measure_site(
    traced: Traced, built: BuiltSite, stages: StageMap, measured_alike: dict[tuple, tuple]
) -> SiteChange | Rejection:
    """Measure a site alone, old and new, on its traced input shape.

    A new block whose output has another shape than the site's cannot stand in for it: that site is rejected
    (the others go on). A block that fails to run, or does not return one tensor, is a builder's bug: an error
    naming the site and the rule.

    Sites alike — the same old and new modules (classes and every attribute, weights by shape) on the same
    input — measure alike: ``measured_alike`` keeps what the first of them measured for the others.
    """
    match, site = built.match, built.match.site
    block_name = type(built.block).__name__
    at = f"site {match.path!r}: rule {match.rule.name!r}: {block_name}"
    old_module = site_module(traced, match)
    alike = module_signature(old_module), module_signature(built.block)
    key = (*alike, site.in_shape, site.dtype) if None not in alike else None
    if key in measured_alike:
        out_shape, old, new = measured_alike[key]
    else:
        x = torch.empty(site.in_shape, dtype=site.dtype, device="meta")
        try:
            out = run(built.block, (x,)).value
        except RunFailed as failure:
            raise BuildError(f"{at} fails on the site's input {site.in_shape}: {failure.reason}") from None
        if not isinstance(out, torch.Tensor):
            raise ShapeCheckError(f"{at} returns {type(out).__name__}, not one tensor as the site does")
        out_shape = tuple(out.shape)
        old, new = None, None
        if out_shape == site.out_shape:
            old = profile(old_module, (x,), stages=StageMap()).total
            new = profile(built.block, (x,), stages=StageMap()).total
        if key is not None:
            measured_alike[key] = out_shape, old, new
    if out_shape != site.out_shape:
        return Rejection(
            match.path,
            match.rule.name,
            f"{block_name} gives {out_shape} for input {site.in_shape}, but the site gives {site.out_shape}",
        )
    return SiteChange(
        calls=match.calls,
        untied=match.untied,
        path=match.path,
        rule=match.rule.name,
        stage=stages.stage_of(match.path),
        kind=match.kind,
        replaced=_summary(site.module_type, site, {}, show_kernel=bool(match.rule.match.chain)),
        replacement=_summary(
            type(built.block).__name__, site, built.options, show_kernel=bool(match.rule.match.chain)
        ),
        params=Delta(old.params, new.params),
        flops=Delta(old.flops * match.calls, new.flops * match.calls),
        modules=_replaced_modules(traced, match),
    )


def _replaced_modules(traced: Traced, match: Match) -> tuple[str, ...]:
    if match.kind is Kind.MODULE:
        return (match.path,)
    return tuple(site_module_paths(traced, match)) if match.kind is Kind.MODULES else ()


def _summary(type_name: str, site: Site, options: dict, *, show_kernel: bool) -> BlockSummary:
    """The block and the site's figures; the kernel for conv sites only (a block's first inner conv says
    nothing about the block)."""
    return BlockSummary(
        type_name,
        site.in_channels,
        site.out_channels,
        site.stride,
        kernel_size=site.kernel_size if show_kernel else None,
        n=options.get("n"),
    )


def _tensors(inputs: tuple) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def _to_meta(inputs: tuple) -> tuple:
    return torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, inputs)
