"""Search-space files (``search_spaces/*.yaml``): schema, validation, and their Ray Tune form.

A file is validated completely before Ray starts; every problem is one ``SketchError`` line that
names the file and the field. Schema (all sections but ``experiment`` and ``model`` optional)::

    experiment: demo                    # results/<experiment>/
    data:
      dir: data/demo                    # competition layout; relative paths: to the working
                                        # directory
      demo: true                        # generate the demo data set here if it is missing
    model: {name: test_resnet, pretrained: false, image_size: 48, checkpoint_file: ""}
      # name and image_size may be searched: {choice: [...]} or branches (below); they come first
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}     # of ONE trial (DDP workers)
      # head_cpus: 1, head_gpus: 0.125  # a head-only trial on cached features: one process, no DDP
      # by_model: {<model>: {workers: 4}}   # other resources for a trial of one searched model
    search:
      searcher: optuna                  # optuna (TPE) | random | grid
      num_samples: 6                    # trials (grid: repeats of the grid)
      max_concurrent: 1                 # trials at once
      metric: val_acc
      mode: max
      seed: 0
      startup_trials: 10                # optuna: random trials before TPE models the results
                                        # (n_startup_trials)
      max_failures: 2                   # retries of a failed trial from its last checkpoint
      keep_checkpoints: 2               # the best N per trial are kept
      budget_gpu_hours: 0               # 0: none; once spent, no trial starts and running ones stop
      budget_hours: 0                   # wall clock, over every run of the search
      final_fit_share: 0.1              # of the budgets, kept for final_fit.py after the search
      start_from: [{freeze: head, lr: 1.0e-3}]   # tried first, in addition to num_samples
    scheduler: {type: asha, max_epochs: 4, grace_period: 1, reduction_factor: 2}   # or type: none
    fixed: {batch_size: 32, ...}        # any TrainConfig field; also the value of an inactive
                                        # parameter
    space:                              # any TrainConfig field: one distribution, or branches
      freeze: {choice: [none, head]}
      lr:                               # the first branch whose `when` matches earlier values
        - when: {freeze: head}
          loguniform: [1.0e-3, 1.0e-2]
        - loguniform: [1.0e-4, 1.0e-3]  # no `when`: every other trial; no match: inactive
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_jobs.params import DISTRIBUTIONS, Branch, Distribution, Param, SearchedParams
from sketch_core.config import TrainConfig
from sketch_core.errors import SketchError
from sketch_core.settings import from_mapping, spec

SEARCHERS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "none")
METRICS = {"val_acc": "max", "val_loss": "min", "train_loss": "min"}
SECTIONS = {"experiment", "data", "model", "resources", "search", "scheduler", "fixed", "space"}
# TrainConfig fields that sections other than ``fixed`` own.
OWNED_FIELDS = {
    "data_dir": "data.dir",
    "model": "model.name",
    "pretrained": "model.pretrained",
    "image_size": "model.image_size",
    "checkpoint_file": "model.checkpoint_file",
    "epochs": "scheduler.max_epochs",
}
# TrainConfig fields that say where or how fast a run goes, not what it learns.
RUN_ONLY_FIELDS = ("data_dir", "num_workers", "decode_cache", "checkpoint_file", "compile")
# model.<key> that may be searched, and the TrainConfig field each one is.
SEARCHABLE_MODEL_KEYS = {"name": "model", "image_size": "image_size"}


@dataclass(frozen=True)
class Resources:
    """What one trial holds. A trial that trains a head on cached features runs in its own Ray Tune
    process with ``head_cpus`` and ``head_gpus`` (a fraction: several share a GPU); any other is a
    TorchTrainer of ``workers`` DDP workers plus the trial process's ``TRIAL_CPUS``."""

    workers: int = field(default=1, metadata=spec(low=1))
    cpus_per_worker: float = field(default=1.0, metadata=spec(low=0.0, low_open=True))
    gpus_per_worker: float = field(default=0.0, metadata=spec(low=0.0))
    head_cpus: float = field(default=1.0, metadata=spec(low=0.0, low_open=True))
    # parse_space: HEAD_GPUS when the workers have GPUs and the file sets none
    head_gpus: float = field(default=0.0, metadata=spec(low=0.0))
    # What a trial of one of the searched models holds instead (resources.by_model in the file).
    by_model: dict[str, Resources] = field(default_factory=dict)

    # The trial itself only waits on its TorchTrainer; {"CPU": 0} is refused by Tune.
    TRIAL_CPUS = 0.05
    # A head on 15k x 1024 features uses a sliver of a GPU: 8 such trials share one by default.
    HEAD_GPUS = 0.125

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Resources:
        """From search.json (``dataclasses.asdict`` of one)."""
        by_model = {
            model: cls.from_dict(own) for model, own in (values.get("by_model") or {}).items()
        }
        return cls(**{**values, "by_model": by_model})

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def per_worker(self) -> dict[str, float]:
        return {
            "CPU": self.cpus_per_worker,
            **({"GPU": self.gpus_per_worker} if self.use_gpu else {}),
        }

    def per_trial(self) -> dict[str, float]:
        """What one DDP trial holds in all: its own share plus all its workers'."""
        return {
            key: value * self.workers + (self.TRIAL_CPUS if key == "CPU" else 0)
            for key, value in self.per_worker().items()
        }

    def head_trial(self) -> dict[str, float]:
        """What one head-only trial holds: its process's share."""
        return {"CPU": self.head_cpus, **({"GPU": self.head_gpus} if self.head_gpus > 0 else {})}

    def of_model(self, model: str) -> Resources:
        """What a trial of ``model`` is given."""
        return self.by_model.get(model, self)

    def of_trial(self, config: dict[str, Any]) -> dict[str, float]:
        """What the trial of this TrainConfig dict holds in all, of either kind."""
        resources = self.of_model(config["model"])
        return resources.head_trial() if runs_in_trial_process(config) else resources.per_trial()


def runs_in_trial_process(config: dict[str, Any]) -> bool:
    """Whether the trial of this TrainConfig dict trains in Ray Tune's own trial process (a head on
    cached features: no Ray Train, no DDP) rather than in a TorchTrainer's workers."""
    return TrainConfig.from_dict(config, source="trial config").uses_feature_cache


@dataclass(frozen=True)
class SearchSettings:
    searcher: str = field(default="optuna", metadata=spec(choices=SEARCHERS))
    num_samples: int = field(default=8, metadata=spec(low=1))
    max_concurrent: int = field(default=1, metadata=spec(low=1))
    metric: str = field(default="val_acc", metadata=spec(choices=tuple(METRICS)))
    mode: str = field(default="max", metadata=spec(choices=("max", "min")))
    seed: int = 0
    # Optuna's n_startup_trials: TPE draws at random until the study holds this many trials
    # (warm-start and start_from trials count), so a search of fewer trials is a random search.
    startup_trials: int = field(default=10, metadata=spec(low=0))
    max_failures: int = field(default=2, metadata=spec(low=0))
    keep_checkpoints: int = field(default=2, metadata=spec(low=1))
    # 0: no budget. Once spent no trial starts and the running ones stop
    budget_gpu_hours: float = field(default=0.0, metadata=spec(low=0.0))
    # wall clock, over every run of the search (--resume included)
    budget_hours: float = field(default=0.0, metadata=spec(low=0.0))
    # The budgets cover the search and its final fit: the search stops once it has spent all but
    # this share of them, which final_fit.py has.
    final_fit_share: float = field(default=0.1, metadata=spec(low=0.0, high=0.9))


@dataclass(frozen=True)
class SchedulerSettings:
    type: str = field(default="asha", metadata=spec(choices=SCHEDULERS))
    max_epochs: int = field(default=4, metadata=spec(low=1))
    grace_period: int = field(default=1, metadata=spec(low=1))
    reduction_factor: float = field(default=2.0, metadata=spec(low=1.0, low_open=True))


@dataclass(frozen=True)
class DataSettings:
    dir: str = "data/demo"
    demo: bool = False


@dataclass(frozen=True)
class SearchSpace:
    source: str
    experiment: str
    data: DataSettings
    resources: Resources
    search: SearchSettings
    scheduler: SchedulerSettings
    base: dict[str, Any]  # TrainConfig values every trial shares; an inactive parameter's value
    params: SearchedParams = SearchedParams()
    start_from: tuple[dict[str, Any], ...] = ()  # searched values of the trials run first

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: the values every trial starts from. The searcher adds each
        trial's searched values (tuning.py), so that each trial's config is a whole TrainConfig
        dict."""
        return dict(self.base)

    def why_not_drawn(self, config: dict[str, Any]) -> str | None:
        """Why a trial of another search that ran ``config`` is not one this space could draw (None:
        it is): a searched value outside its branch, or another setting than this space's."""
        outside = self.params.outside(config)
        if outside:
            return outside
        for key, value in self.base.items():
            if key not in self.params and key not in RUN_ONLY_FIELDS and config.get(key) != value:
                return f"{key}={config.get(key)!r}, here {value!r}"
        return None

    def models(self) -> list[str]:
        """Every model a trial may train."""
        return self.params["model"].values() if "model" in self.params else [self.base["model"]]

    def with_overrides(self, **changes: Any) -> SearchSpace:
        """Values over the file's: experiment, data_dir, num_samples, max_concurrent (from the
        command line), checkpoint_file (made absolute by the driver)."""
        space = self
        if changes.get("experiment"):
            space = dataclasses.replace(
                space, experiment=_experiment_name(changes["experiment"], "--name")
            )
        if changes.get("data_dir"):
            space = dataclasses.replace(
                space,
                data=DataSettings(dir=changes["data_dir"], demo=False),
                base={**space.base, "data_dir": changes["data_dir"]},
            )
        if changes.get("checkpoint_file"):
            space = dataclasses.replace(
                space, base={**space.base, "checkpoint_file": changes["checkpoint_file"]}
            )
        search = {
            key: changes[key]
            for key in ("num_samples", "max_concurrent")
            if changes.get(key) is not None
        }
        for key, value in search.items():
            if value < 1:
                raise SketchError(f"--{key.replace('_', '-')}: expected at least 1, got {value}")
        if search:
            space = dataclasses.replace(space, search=dataclasses.replace(space.search, **search))
        return space


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SketchError(f"{path}: search-space file not found")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SketchError(
            f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})"
        ) from None
    return parse_space(document, source=str(path))


def parse_space(document: Any, *, source: str) -> SearchSpace:
    if not isinstance(document, dict):
        raise SketchError(
            f"{source}: expected a mapping with sections {', '.join(sorted(SECTIONS))}"
        )
    _no_unknown(document, SECTIONS, source, "")
    if "experiment" not in document:
        raise SketchError(
            f"{source}: experiment: a name is required (results go to results/<experiment>/)"
        )
    if not isinstance(document.get("model"), dict) or "name" not in document["model"]:
        raise SketchError(f"{source}: model.name: a timm model name is required")
    experiment = _experiment_name(document["experiment"], f"{source}: experiment")
    data = _section(DataSettings, document.get("data"), source, "data")
    model = _mapping(document["model"], source, "model")
    _no_unknown(model, {"name", "pretrained", "image_size", "checkpoint_file"}, source, "model.")
    search_section = dict(_mapping(document.get("search") or {}, source, "search"))
    start_from = search_section.pop("start_from", [])
    search = _section(SearchSettings, search_section, source, "search")
    scheduler = _section(SchedulerSettings, document.get("scheduler"), source, "scheduler")

    # Parameters in the order they are drawn: the model's searched keys first, then space: as
    # written.
    searched_model = {
        key: value
        for key, value in model.items()
        if key in SEARCHABLE_MODEL_KEYS and isinstance(value, (dict, list))
    }
    specs = [
        (SEARCHABLE_MODEL_KEYS[key], spec, f"{source}: model.{key}")
        for key, spec in searched_model.items()
    ]
    for name, param_spec in _mapping(document.get("space") or {}, source, "space").items():
        if name in OWNED_FIELDS:
            hint = (
                f"model.{name if name == 'image_size' else 'name'}: {{choice: [...]}}"
                if name in SEARCHABLE_MODEL_KEYS.values()
                else OWNED_FIELDS[name]
            )
            raise SketchError(f"{source}: space.{name}: cannot be searched here; set {hint}")
        TrainConfig.check_keys([name], source=f"{source}: space")
        specs.append((name, param_spec, f"{source}: space.{name}"))

    fixed = _mapping(document.get("fixed") or {}, source, "fixed")
    for key in fixed:
        if key in OWNED_FIELDS:
            raise SketchError(f"{source}: fixed.{key}: set it as {OWNED_FIELDS[key]} instead")
    params: list[Param] = []
    names = [name for name, _, _ in specs]
    for index, (name, param_spec, where) in enumerate(specs):
        params.append(
            _param(
                name,
                param_spec,
                where,
                earlier={p.name: p for p in params},
                later=names[index + 1 :],
            )
        )
    first_of = {}  # a searched model key's value in the base config: its first option
    for param, (_, _, where) in zip(params, specs):
        if param.name in SEARCHABLE_MODEL_KEYS.values():
            if not all(branch.distribution.finite for branch in param.branches):
                raise SketchError(f"{where}: expected a choice (or grid) of values, got a range")
            first_of[param.name] = param.values()[0]
    base = {
        "data_dir": data.dir,
        "model": model["name"],
        "epochs": scheduler.max_epochs,
        **fixed,
        **{key: value for key, value in model.items() if key != "name"},
        **first_of,
    }
    base_config = TrainConfig.from_dict(base, source=source).to_dict()
    for param, (name, param_spec, where) in zip(params, specs):
        if name in fixed and not param.conditional:
            raise SketchError(
                f"{where}: also set in fixed, which no trial would use; keep one "
                "(fixed gives the value of a parameter only where its branches leave it inactive)"
            )
        for index, branch in enumerate(
            param.branches
        ):  # every branch's bounds make a valid config, under its conditions
            at = f"{where}[{index}]" if isinstance(param_spec, list) else where
            for condition in branch.condition_values():
                for value in branch.distribution.bounds():
                    TrainConfig.from_dict({**base_config, **condition, name: value}, source=at)
    distributions = [branch.distribution for param in params for branch in param.branches]
    if search.searcher == "optuna" and any(d.kind == "grid" for d in distributions):
        raise SketchError(
            f"{source}: space: grid values need search.searcher grid or random, not optuna"
        )
    if search.searcher == "grid" and any(d.kind not in ("grid", "choice") for d in distributions):
        raise SketchError(f"{source}: space: search.searcher grid takes only grid or choice lists")
    if search.searcher == "grid":
        params = [
            Param(
                p.name,
                tuple(
                    Branch(b.when, Distribution("grid", b.distribution.args)) for b in p.branches
                ),
            )
            for p in params
        ]
    searched = SearchedParams(tuple(params))
    from sketch_core.models import check_model_name  # imports timm: only where a space file is read

    for model in searched["model"].values() if "model" in searched else [base_config["model"]]:
        check_model_name(model, f"{source}: model.name")
    resources = _resources(document.get("resources"), searched, source)
    _check_settings(search, scheduler, source)
    return SearchSpace(
        source=source,
        experiment=experiment,
        data=data,
        resources=resources,
        search=search,
        scheduler=scheduler,
        base=base_config,
        params=searched,
        start_from=_start_from(start_from, searched, base_config, source),
    )


def _param(
    name: str, spec: Any, where: str, *, earlier: dict[str, Param], later: list[str]
) -> Param:
    """One searched parameter: a distribution, or a list of branches
    ``{when: {...}, <distribution>}`` tried in order."""
    if isinstance(spec, list):
        if not spec:
            raise SketchError(f"{where}: expected a distribution or a non-empty list of branches")
        items = [(f"{where}[{index}]", item) for index, item in enumerate(spec)]
    else:
        items = [(where, spec)]
    branches: list[Branch] = []
    for at, item in items:
        if isinstance(spec, list) and not isinstance(item, dict):
            raise SketchError(
                f"{at}: expected a branch such as "
                "{when: {freeze: head}, loguniform: [1.0e-4, 1.0e-2]}, "
                f"got {item!r}"
            )
        rest = (
            {key: value for key, value in item.items() if key != "when"}
            if isinstance(item, dict)
            else item
        )
        branch = Branch(
            _conditions(
                name, item.get("when") if isinstance(item, dict) else None, at, earlier, later
            ),
            _distribution(rest, at),
        )
        for prior in branches:
            if prior.covers(branch):
                raise SketchError(
                    f"{at}: can never match: the branch before it "
                    f"({'when ' + prior.label if prior.when else 'without when'}) "
                    "takes every trial it would"
                )
        branches.append(branch)
    return Param(name, tuple(branches))


def _conditions(
    name: str, when: Any, where: str, earlier: dict[str, Param], later: list[str]
) -> tuple:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise SketchError(
            f"{where}.when: expected a mapping of parameters searched before {name} "
            "to their values, "
            f"got {when!r}"
        )
    conditions = []
    for key, wanted in when.items():
        at = f"{where}.when.{key}"
        if key not in earlier:
            if key in later:
                raise SketchError(
                    f"{at}: {key} is searched after {name}; a condition can only name a parameter "
                    "searched before it (move it up)"
                )
            if key in TrainConfig.field_names():
                raise SketchError(
                    f"{at}: {key} is not searched; "
                    f"a condition names a parameter searched before {name}"
                )
            raise SketchError(
                f"{at}: unknown parameter; expected one of the parameters searched before {name}: "
                f"{', '.join(earlier) or 'none'}"
            )
        condition_on = earlier[key]
        if not all(branch.distribution.finite for branch in condition_on.branches):
            raise SketchError(
                f"{at}: {key} is searched over a range; "
                "a condition needs a choice or grid parameter"
            )
        allowed = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        for value in allowed:
            if value not in condition_on.values():
                raise SketchError(
                    f"{at}: {value!r} is not one of {key}'s values "
                    f"({', '.join(map(str, condition_on.values()))})"
                )
        conditions.append((key, allowed))
    return tuple(conditions)


def _resources(values: Any, params: SearchedParams, source: str) -> Resources:
    """resources, with ``by_model: {<model>: {workers: 8, ...}}`` for the models that need other
    ones."""
    values = dict(_mapping(values or {}, source, "resources"))
    by_model = _mapping(values.pop("by_model", None) or {}, source, "resources.by_model")
    common = _section(Resources, values, source, "resources")
    models = params["model"].values() if "model" in params else []
    overrides = {}
    for model, changes in by_model.items():
        if model not in models:
            raise SketchError(
                f"{source}: resources.by_model.{model}: not one of model.name's choices "
                f"({', '.join(map(str, models)) or 'model.name is not searched'})"
            )
        own = _section(
            Resources,
            {**values, **_mapping(changes, source, f"resources.by_model.{model}")},
            source,
            f"resources.by_model.{model}",
        )
        overrides[model] = _with_head_gpus(own, {**values, **changes})
    return dataclasses.replace(_with_head_gpus(common, values), by_model=overrides)


def _with_head_gpus(resources: Resources, values: dict) -> Resources:
    if resources.gpus_per_worker > 0 and "head_gpus" not in values:
        return dataclasses.replace(resources, head_gpus=Resources.HEAD_GPUS)
    return resources


def _start_from(
    points: Any, params: SearchedParams, base: dict[str, Any], source: str
) -> tuple[dict, ...]:
    """search.start_from: known-good configurations (a recipe's defaults) that the search tries
    first. Each gives values of searched parameters; an active one it leaves out keeps its fixed or
    default value, which must then lie in its distribution."""
    if not isinstance(points, list):
        points = [points]
    trials = []
    for index, point in enumerate(points):
        name = f"search.start_from[{index}]"
        where = f"{source}: {name}"
        point = _mapping(point, source, name)
        for key in point:
            if key not in params:
                raise SketchError(
                    f"{where}.{key}: not a searched parameter; "
                    f"expected one of {', '.join(params.names)}"
                )
        config = {**base, **point}
        TrainConfig.from_dict(config, source=where)
        values = {name: config[name] for name in params.active(config)}
        outside = params.outside(config)
        if outside:
            raise SketchError(f"{where}: {outside}; give a value inside it")
        trials.append(values)
    return tuple(trials)


def _check_settings(search: SearchSettings, scheduler: SchedulerSettings, source: str) -> None:
    """The checks that involve several settings (each one's own range: ``from_mapping``)."""
    if scheduler.grace_period > scheduler.max_epochs:
        raise SketchError(
            f"{source}: scheduler.grace_period: expected 1..max_epochs ({scheduler.max_epochs}), "
            f"got {scheduler.grace_period}"
        )
    if search.mode != METRICS[search.metric]:
        raise SketchError(
            f"{source}: search.mode: {search.metric} is best at {METRICS[search.metric]}, "
            f"got {search.mode}"
        )


def _distribution(spec: Any, where: str) -> Distribution:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SketchError(
            f"{where}: expected one distribution such as {{loguniform: [1.0e-5, 1.0e-3]}}, "
            f"got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SketchError(
            f"{where}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}"
        )
    if not isinstance(args, list) or not args:
        raise SketchError(f"{where}: {kind}: expected a non-empty list, got {args!r}")
    arity = DISTRIBUTIONS[kind]
    if arity is None:
        return Distribution(kind, tuple(args))
    if len(args) != arity:
        names = "[low, high, q]" if arity == 3 else "[low, high]"
        raise SketchError(f"{where}: {kind}: expected {names}, got {args!r}")
    try:
        numbers = tuple(int(a) if kind.endswith("randint") else float(a) for a in args)
    except (TypeError, ValueError):
        raise SketchError(f"{where}: {kind}: expected numbers, got {args!r}") from None
    low, high = numbers[0], numbers[1]
    if not all(math.isfinite(n) for n in numbers):
        raise SketchError(f"{where}: {kind}: expected finite numbers, got {args!r}")
    if low >= high:
        raise SketchError(f"{where}: {kind}: low ({low}) must be below high ({high})")
    if "log" in kind and low <= 0:
        raise SketchError(f"{where}: {kind}: bounds must be > 0, got low {low}")
    if arity == 3 and numbers[2] <= 0:
        raise SketchError(f"{where}: {kind}: q must be > 0, got {numbers[2]}")
    return Distribution(kind, numbers)


def _section(kind, values: Any, source: str, name: str):
    return from_mapping(
        kind, _mapping(values or {}, source, name), source=source, prefix=f"{name}."
    )


def _mapping(value: Any, source: str, name: str) -> dict:
    if not isinstance(value, dict):
        raise SketchError(f"{source}: {name}: expected a mapping, got {value!r}")
    return value


def _no_unknown(values: dict, known: set[str], source: str, prefix: str) -> None:
    for key in values:
        if key not in known:
            raise SketchError(
                f"{source}: {prefix}{key}: unknown key; expected one of {', '.join(sorted(known))}"
            )


def _experiment_name(name: Any, where: str) -> str:
    text = str(name)
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
        raise SketchError(
            f"{where}: expected a folder name of letters, digits, '-', '_' or '.', got {name!r}"
        )
    return text
