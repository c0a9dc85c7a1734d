"""Searched parameters: each one a list of branches, a branch one distribution chosen by the values
of parameters searched before it (ARCHITECTURE.md, "Conditional parameters").

A trial's values are drawn parameter by parameter in the file's order: the first branch whose
``when`` matches the values drawn so far gives the distribution; with no match the parameter is
inactive and the trial keeps its ``fixed`` or default value. The same walk serves every searcher:

- Optuna, define-by-run (``SearchedParams.suggest``): a parameter with several branches is one
  Optuna parameter per branch (``lr|freeze=head``), so TPE models each branch on the trials that
  drew it rather than mixing, say, head-only and fine-tuning learning rates;
- random search (``draw``): seeded draws from Ray Tune's own samplers;
- grid search (``draw`` of ``grid`` lists): every combination the branches allow.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# name: number of arguments (low, high[, q]) or None for a list of values
DISTRIBUTIONS = {
    "loguniform": 2,
    "uniform": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "qrandint": 3,
    "choice": None,
    "grid": None,
}
# Joins a parameter's name and its branch in Optuna's name for that branch.
BRANCH_MARK = "|"


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple

    @property
    def finite(self) -> bool:
        """A list of values (choice, grid) rather than a range."""
        return DISTRIBUTIONS[self.kind] is None

    def bounds(self) -> list[Any]:
        """Values that must each make a valid TrainConfig: the ends of a range, or every option."""
        return list(self.args) if self.finite else [self.args[0], self.args[1]]

    def contains(self, value: Any) -> bool:
        if self.finite:
            return value in self.args
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            return False
        # randint's high is exclusive, as in Ray Tune
        return (
            self.args[0] <= value < self.args[1]
            if self.kind == "randint"
            else self.args[0] <= value <= self.args[1]
        )

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def optuna(self):
        """The Optuna distribution Ray Tune's OptunaSearch would make of this one."""
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch.convert_search_space({"x": self.tune_domain()})["x"]

    def describe(self) -> dict[str, Any]:
        """For search.json and the report: kind and arguments."""
        return {"kind": self.kind, "args": list(self.args)}


@dataclass(frozen=True)
class Branch:
    when: tuple[
        tuple[str, tuple], ...
    ]  # (parameter, the values it matches), all must hold; () matches always
    distribution: Distribution

    def matches(self, values: dict[str, Any]) -> bool:
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def covers(self, other: Branch) -> bool:
        """Whether every trial ``other`` matches is matched by this branch too."""
        theirs = dict(other.when)
        return all(
            name in theirs and set(theirs[name]) <= set(allowed) for name, allowed in self.when
        )

    def condition_values(self) -> Iterator[dict[str, Any]]:
        """Every combination of values the conditions match."""
        names = [name for name, _ in self.when]
        for combination in itertools.product(*(allowed for _, allowed in self.when)):
            yield dict(zip(names, combination))

    @property
    def label(self) -> str:
        return (
            ", ".join(f"{name}={' or '.join(map(str, allowed))}" for name, allowed in self.when)
            or "otherwise"
        )

    def describe(self) -> dict[str, Any]:
        return {
            **({"when": {name: list(allowed) for name, allowed in self.when}} if self.when else {}),
            **self.distribution.describe(),
        }


@dataclass(frozen=True)
class Param:
    name: str
    branches: tuple[Branch, ...]

    @property
    def conditional(self) -> bool:
        """Whether some trials may leave this parameter inactive."""
        return not any(not branch.when for branch in self.branches)

    def active(self, values: dict[str, Any]) -> Branch | None:
        """The branch the values of earlier parameters choose; None: inactive for this trial."""
        return next((branch for branch in self.branches if branch.matches(values)), None)

    def optuna_name(self, branch: Branch) -> str:
        return self.name if len(self.branches) == 1 else f"{self.name}{BRANCH_MARK}{branch.label}"

    def values(self) -> list[Any]:
        """Every value a finite parameter can take, over all its branches."""
        return list(
            dict.fromkeys(value for branch in self.branches for value in branch.distribution.args)
        )

    def describe(self) -> dict[str, Any]:
        return {"branches": [branch.describe() for branch in self.branches]}


@dataclass(frozen=True)
class SearchedParams:
    """The searched parameters in the order they are drawn."""

    params: tuple[Param, ...] = ()

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, name: str) -> bool:
        return any(param.name == name for param in self.params)

    def __getitem__(self, name: str) -> Param:
        return next(param for param in self.params if param.name == name)

    @property
    def names(self) -> list[str]:
        return [param.name for param in self.params]

    def active(self, config: dict[str, Any]) -> dict[str, Branch]:
        """The branch each parameter active in this trial's config drew from."""
        values, branches = {}, {}
        for param in self.params:
            branch = param.active(values)
            if branch is not None:
                branches[param.name] = branch
                values[param.name] = config.get(param.name)
        return branches

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: ask ``trial`` for each active parameter in turn."""
        values: dict[str, Any] = {}
        for param in self.params:
            branch = param.active(values)
            if branch is not None:
                values[param.name] = suggest_value(
                    trial, param.optuna_name(branch), branch.distribution.optuna()
                )
        return values

    def draw(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        """The trials of one sample: one random draw, or one per combination of the active grid
        lists."""

        def extend(index: int, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if index == len(self.params):
                yield values
                return
            param = self.params[index]
            branch = param.active(values)
            if branch is None:
                yield from extend(index + 1, values)
            elif branch.distribution.kind == "grid":
                for value in branch.distribution.args:
                    yield from extend(index + 1, {**values, param.name: value})
            else:
                value = branch.distribution.tune_domain().sample(random_state=rng)
                yield from extend(index + 1, {**values, param.name: plain(value)})

        return list(extend(0, {}))

    def outside(self, config: dict[str, Any]) -> str | None:
        """Why this config could not have been drawn from these parameters (None: it could)."""
        for name, branch in self.active(config).items():
            if not branch.distribution.contains(config.get(name)):
                return (
                    f"{name}={config.get(name)!r} is outside {branch.distribution.kind} "
                    f"{list(branch.distribution.args)}"
                )
        return None

    def optuna_trial_params(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Optuna's params and distributions for a trial that ran ``config`` (a warm start)."""
        params, distributions = {}, {}
        for name, branch in self.active(config).items():
            optuna_name = self[name].optuna_name(branch)
            params[optuna_name], distributions[optuna_name] = (
                config[name],
                branch.distribution.optuna(),
            )
        return params, distributions


def suggest_value(trial, name: str, distribution) -> Any:
    """``trial.suggest_*`` for an Optuna distribution (the public API, rather than
    ``trial._suggest``)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    raise TypeError(f"{name}: no Optuna suggestion for {type(distribution).__name__}")


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value."""
    return value.item() if hasattr(value, "item") else value
