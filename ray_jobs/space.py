"""Search-space files (``search_spaces/*.yaml``): schema, validation, and their Ray Tune form.

A file is validated completely before Ray starts; every problem is one ``SketchError`` line that
names the file and the field. Schema (all sections but ``experiment`` and ``model`` optional)::

    experiment: demo                    # results/<experiment>/
    data:
      dir: data/demo                    # competition layout; relative paths: to the working directory
      demo: true                        # generate the demo data set here if it is missing
    model: {name: test_resnet, pretrained: false, image_size: 48, checkpoint_file: ""}
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}     # of ONE trial (DDP workers)
      # head_cpus: 1, head_gpus: 0.125  # a head-only trial on cached features: one process, no DDP
    search:
      searcher: optuna                  # optuna (TPE) | random | grid
      num_samples: 6                    # trials (grid: repeats of the grid)
      max_concurrent: 1                 # trials at once
      metric: val_acc
      mode: max
      seed: 0
      max_failures: 2                   # retries of a failed trial from its last checkpoint
      keep_checkpoints: 2               # the best N per trial are kept
    scheduler: {type: asha, max_epochs: 4, grace_period: 1, reduction_factor: 2}   # or type: none
    fixed: {batch_size: 32, ...}        # any TrainConfig field
    space:                              # any TrainConfig field: one distribution each
      lr: {loguniform: [1.0e-4, 1.0e-2]}
      freeze: {choice: [none, head]}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sketch_core.config import TrainConfig
from sketch_core.errors import SketchError

SEARCHERS = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "none")
METRICS = {"val_acc": "max", "val_loss": "min", "train_loss": "min"}
# name: number of arguments (low, high[, q]) or None for a list of values
DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2, "qrandint": 3,
                 "choice": None, "grid": None}
SECTIONS = {"experiment", "data", "model", "resources", "search", "scheduler", "fixed", "space"}
# TrainConfig fields that sections other than ``fixed`` own.
OWNED_FIELDS = {"data_dir": "data.dir", "model": "model.name", "pretrained": "model.pretrained",
                "image_size": "model.image_size", "checkpoint_file": "model.checkpoint_file",
                "epochs": "scheduler.max_epochs"}


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple

    def bounds(self) -> list[Any]:
        """Values that must each make a valid TrainConfig: the ends of a range, or every option."""
        return list(self.args) if DISTRIBUTIONS[self.kind] is None else [self.args[0], self.args[1]]

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class Resources:
    """What one trial holds. A trial that trains a head on cached features runs in its own Ray Tune
    process with ``head_cpus`` and ``head_gpus`` (a fraction: several share a GPU); any other is a
    TorchTrainer of ``workers`` DDP workers plus the trial process's ``TRIAL_CPUS``."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    head_cpus: float = 1.0
    head_gpus: float = 0.0  # parse_space: HEAD_GPUS when the workers have GPUs and the file sets none

    # The trial itself only waits on its TorchTrainer; {"CPU": 0} is refused by Tune.
    TRIAL_CPUS = 0.05
    # A head on 15k x 1024 features uses a sliver of a GPU: 8 such trials share one by default.
    HEAD_GPUS = 0.125

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}

    def per_trial(self) -> dict[str, float]:
        """What one DDP trial holds in all: its own share plus all its workers'."""
        return {key: value * self.workers + (self.TRIAL_CPUS if key == "CPU" else 0)
                for key, value in self.per_worker().items()}

    def head_trial(self) -> dict[str, float]:
        """What one head-only trial holds: its process's share."""
        return {"CPU": self.head_cpus, **({"GPU": self.head_gpus} if self.head_gpus > 0 else {})}

    def of_trial(self, config: dict[str, Any]) -> dict[str, float]:
        """What the trial of this TrainConfig dict holds in all."""
        return self.head_trial() if runs_in_trial_process(config) else self.per_trial()


def runs_in_trial_process(config: dict[str, Any]) -> bool:
    """Whether the trial of this TrainConfig dict trains in Ray Tune's own trial process (a head on
    cached features: no Ray Train, no DDP) rather than in a TorchTrainer's workers."""
    return TrainConfig.from_dict(config, source="trial config").uses_feature_cache


@dataclass(frozen=True)
class SearchSettings:
    searcher: str = "optuna"
    num_samples: int = 8
    max_concurrent: int = 1
    metric: str = "val_acc"
    mode: str = "max"
    seed: int = 0
    max_failures: int = 2
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class SchedulerSettings:
    type: str = "asha"
    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: float = 2.0


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
    base: dict[str, Any]  # TrainConfig values every trial shares
    params: dict[str, Distribution] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: each trial's config is a whole TrainConfig dict."""
        return {**self.base, **{name: dist.tune_domain() for name, dist in self.params.items()}}

    def with_overrides(self, **changes: Any) -> "SearchSpace":
        """Values over the file's: experiment, data_dir, num_samples, max_concurrent (from the command
        line), checkpoint_file (made absolute by the driver)."""
        space = self
        if changes.get("experiment"):
            space = dataclasses.replace(space, experiment=_experiment_name(changes["experiment"], "--name"))
        if changes.get("data_dir"):
            space = dataclasses.replace(space, data=DataSettings(dir=changes["data_dir"], demo=False),
                                        base={**space.base, "data_dir": changes["data_dir"]})
        if changes.get("checkpoint_file"):
            space = dataclasses.replace(space, base={**space.base, "checkpoint_file": changes["checkpoint_file"]})
        search = {key: changes[key] for key in ("num_samples", "max_concurrent") if changes.get(key) is not None}
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
        raise SketchError(f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)})") from None
    return parse_space(document, source=str(path))


def parse_space(document: Any, *, source: str) -> SearchSpace:
    if not isinstance(document, dict):
        raise SketchError(f"{source}: expected a mapping with sections {', '.join(sorted(SECTIONS))}")
    _no_unknown(document, SECTIONS, source, "")
    if "experiment" not in document:
        raise SketchError(f"{source}: experiment: a name is required (results go to results/<experiment>/)")
    if not isinstance(document.get("model"), dict) or "name" not in document["model"]:
        raise SketchError(f"{source}: model.name: a timm model name is required")
    experiment = _experiment_name(document["experiment"], f"{source}: experiment")
    data = _section(DataSettings, document.get("data"), source, "data")
    model = _mapping(document["model"], source, "model")
    _no_unknown(model, {"name", "pretrained", "image_size", "checkpoint_file"}, source, "model.")
    resources = _section(Resources, document.get("resources"), source, "resources")
    if resources.gpus_per_worker > 0 and "head_gpus" not in (document.get("resources") or {}):
        resources = dataclasses.replace(resources, head_gpus=Resources.HEAD_GPUS)
    search = _section(SearchSettings, document.get("search"), source, "search")
    scheduler = _section(SchedulerSettings, document.get("scheduler"), source, "scheduler")
    _check_settings(resources, search, scheduler, source)

    fixed = _mapping(document.get("fixed") or {}, source, "fixed")
    for key in fixed:
        if key in OWNED_FIELDS:
            raise SketchError(f"{source}: fixed.{key}: set it as {OWNED_FIELDS[key]} instead")
    base = {"data_dir": data.dir, "model": model["name"], "epochs": scheduler.max_epochs, **fixed,
            **{key: value for key, value in model.items() if key != "name"}}
    base_config = TrainConfig.from_dict(base, source=source)

    params = {name: _distribution(name, spec, source) for name, spec in
              _mapping(document.get("space") or {}, source, "space").items()}
    for name, dist in params.items():
        if name in OWNED_FIELDS:
            raise SketchError(f"{source}: space.{name}: cannot be searched; set {OWNED_FIELDS[name]}")
        TrainConfig.check_keys([name], source=f"{source}: space")
        if name in fixed:
            raise SketchError(f"{source}: space.{name}: also set in fixed; keep one")
        for value in dist.bounds():
            TrainConfig.from_dict({**base_config.to_dict(), name: value}, source=f"{source}: space.{name}")
    if search.searcher == "optuna" and any(d.kind == "grid" for d in params.values()):
        raise SketchError(f"{source}: space: grid values need search.searcher grid or random, not optuna")
    if search.searcher == "grid" and any(d.kind not in ("grid", "choice") for d in params.values()):
        raise SketchError(f"{source}: space: search.searcher grid takes only grid or choice lists")
    if search.searcher == "grid":
        params = {name: Distribution("grid", d.args) for name, d in params.items()}
    return SearchSpace(source=source, experiment=experiment, data=data, resources=resources, search=search,
                       scheduler=scheduler, base=base_config.to_dict(), params=params)


def _check_settings(resources: Resources, search: SearchSettings, scheduler: SchedulerSettings,
                    source: str) -> None:
    checks = [
        (resources.workers >= 1, "resources.workers", "at least 1", resources.workers),
        (resources.cpus_per_worker > 0, "resources.cpus_per_worker", "a value > 0", resources.cpus_per_worker),
        (resources.gpus_per_worker >= 0, "resources.gpus_per_worker", "a value >= 0", resources.gpus_per_worker),
        (resources.head_cpus > 0, "resources.head_cpus", "a value > 0", resources.head_cpus),
        (resources.head_gpus >= 0, "resources.head_gpus", "a value >= 0", resources.head_gpus),
        (search.searcher in SEARCHERS, "search.searcher", f"one of {', '.join(SEARCHERS)}", search.searcher),
        (search.num_samples >= 1, "search.num_samples", "at least 1", search.num_samples),
        (search.max_concurrent >= 1, "search.max_concurrent", "at least 1", search.max_concurrent),
        (search.metric in METRICS, "search.metric", f"one of {', '.join(METRICS)}", search.metric),
        (search.mode in ("max", "min"), "search.mode", "max or min", search.mode),
        (search.max_failures >= 0, "search.max_failures", "a value >= 0", search.max_failures),
        (search.keep_checkpoints >= 1, "search.keep_checkpoints", "at least 1", search.keep_checkpoints),
        (scheduler.type in SCHEDULERS, "scheduler.type", f"one of {', '.join(SCHEDULERS)}", scheduler.type),
        (scheduler.max_epochs >= 1, "scheduler.max_epochs", "at least 1", scheduler.max_epochs),
        (1 <= scheduler.grace_period <= scheduler.max_epochs, "scheduler.grace_period",
         f"1..max_epochs ({scheduler.max_epochs})", scheduler.grace_period),
        (scheduler.reduction_factor > 1, "scheduler.reduction_factor", "a value > 1", scheduler.reduction_factor),
    ]
    for ok, name, expected, got in checks:
        if not ok:
            raise SketchError(f"{source}: {name}: expected {expected}, got {got!r}")
    if search.mode != METRICS[search.metric]:
        raise SketchError(f"{source}: search.mode: {search.metric} is best at {METRICS[search.metric]}, got {search.mode}")


def _distribution(name: str, spec: Any, source: str) -> Distribution:
    where = f"{source}: space.{name}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SketchError(f"{where}: expected one distribution such as {{loguniform: [1.0e-5, 1.0e-3]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SketchError(f"{where}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}")
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
    values = _mapping(values or {}, source, name)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    _no_unknown(values, set(fields), source, f"{name}.")
    typed = {}
    for key, value in values.items():
        expected = type(getattr(kind(), key))
        if expected is float and isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-3 as text
            except ValueError:
                pass
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise SketchError(f"{source}: {name}.{key}: expected {expected.__name__}, got {value!r}")
        typed[key] = value
    return kind(**typed)


def _mapping(value: Any, source: str, name: str) -> dict:
    if not isinstance(value, dict):
        raise SketchError(f"{source}: {name}: expected a mapping, got {value!r}")
    return value


def _no_unknown(values: dict, known: set[str], source: str, prefix: str) -> None:
    for key in values:
        if key not in known:
            raise SketchError(f"{source}: {prefix}{key}: unknown key; expected one of {', '.join(sorted(known))}")


def _experiment_name(name: Any, where: str) -> str:
    text = str(name)
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
        raise SketchError(f"{where}: expected a folder name of letters, digits, '-', '_' or '.', got {name!r}")
    return text
