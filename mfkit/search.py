"""Hyperparameter search with Optuna: grid, random and TPE studies with equal trial budgets, resumable on disk.

- `Dim` / `space_from`: a search space (ranges, log scales, choices); `suggest` asks an Optuna trial for a point,
  `grid_space` lays a grid of a given number of levels per dimension over the same space.
- `search_splits`: the only data a search sees (train and validation); asking it for the test split is an error,
  and it refuses data whose test rows also sit in a search split.
- `open_study` / `run_study`: studies in SQLite under the artifacts folder, named by a hash of their knobs; a
  rerun loads the study and runs only the trials still missing, so an interrupted search continues.
- `PruningReporter`: the bridge from `fit`'s evaluations to `trial.report` / `trial.should_prune`.
- `spent`, `best_so_far`, `replay_pruner`, `importances`: the bookkeeping the comparison needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MfkitError, check_choice
from .training import Callback, TrainState

SEARCH_SPLITS = ("train", "validation")
COST_STEPS = "steps"  # user attributes every trial stores: optimizer steps and training examples it ran
COST_EXAMPLES = "examples"
COST_SECONDS = "seconds"
FULL_STEPS = "full_steps"  # the steps it would have run unpruned
COSTS = (COST_STEPS, COST_EXAMPLES, COST_SECONDS, FULL_STEPS)


# --------------------------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dim:
    """One dimension: a float range [low, high] (on a log scale when `log`), or a list of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if len(self.choices) == 0:
                raise MfkitError("A dimension has an empty list of choices.", "give at least one value.")
            return
        ok = all(isinstance(v, int | float) and math.isfinite(v) for v in (self.low, self.high))
        if not ok or self.low > self.high or (self.log and self.low <= 0):
            raise MfkitError(
                f"The range [{self.low}, {self.high}]{' (log scale)' if self.log else ''} is not a valid range.",
                "give low <= high, both finite, and low > 0 on a log scale.",
            )


# The spaces notebook 14 searches on MiniLM, by training method, and the defaults the grid keeps for the dimensions
# it does not vary (the notebook takes the rest, learning rate, warmup and batch size, from notebook 03's card).
# For LoRA, the default rate and rank are notebook 05's; weight decay is `TrainConfig`'s default, which 03 used.
SPACES: dict[str, dict[str, Any]] = {
    "full": {
        "lr": [1e-5, 1e-3, "log"],
        "warmup": [0.0, 0.3],
        "weight_decay": [0.0, 0.1],
        "batch_size": {"choices": [8, 16, 32]},
    },
    "lora": {
        "lr": [1e-4, 1e-2, "log"],
        "warmup": [0.0, 0.3],
        "weight_decay": [0.0, 0.1],
        "batch_size": {"choices": [8, 16, 32]},
        "rank": {"choices": [2, 4, 8, 16]},
    },
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"weight_decay": 0.01},
    "lora": {"lr": 1e-3, "weight_decay": 0.01, "rank": 8},
}


def space_from(spec: Mapping[str, Any]) -> dict[str, Dim]:
    """Dims from a profile's plain description: `{"lr": [1e-4, 3e-3, "log"], "warmup": [0, 0.3],
    "batch_size": {"choices": [8, 16, 32]}}`."""
    space = {}
    for name, value in spec.items():
        if isinstance(value, Dim):
            space[name] = value
        elif isinstance(value, Mapping) and "choices" in value:
            space[name] = Dim(choices=tuple(value["choices"]))
        elif isinstance(value, Sequence) and len(value) in (2, 3) and not isinstance(value, str):
            log = len(value) == 3 and value[2] == "log"
            if len(value) == 3 and not log:
                raise MfkitError(
                    f"The third entry of {name}'s range is {value[2]!r}.", 'use "log" or leave it out.'
                )
            space[name] = Dim(float(value[0]), float(value[1]), log=log)
        else:
            raise MfkitError(
                f"The search dimension {name}={value!r} is neither a range nor a list of choices.",
                'write [low, high], [low, high, "log"] or {"choices": [...]}.',
            )
    return space


def suggest(trial: Any, space: Mapping[str, Dim], fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One point of `space` asked from an Optuna trial; the dimensions in `fixed` are not searched (they are
    stored on the trial as user attributes, so every trial still says what it trained with)."""
    fixed = dict(fixed or {})
    params = {}
    for name, dim in space.items():
        if name in fixed:
            params[name] = fixed[name]
            trial.set_user_attr(name, fixed[name])
        elif dim.choices is not None:
            params[name] = trial.suggest_categorical(name, list(dim.choices))
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params


def grid_values(dim: Dim, levels: int) -> list:
    """`levels` evenly spaced values of `dim` (geometrically on a log scale), ends included; for choices,
    `levels` of them spread from the first to the last."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise MfkitError(
            f"levels={levels!r} is not a whole number >= 1.", "give each grid dimension 1 or more levels."
        )
    if dim.choices is not None:
        if levels > len(dim.choices):
            raise MfkitError(
                f"A grid of {levels} levels over {len(dim.choices)} choices {list(dim.choices)}.",
                f"use at most {len(dim.choices)} levels for it.",
            )
        picks = np.linspace(0, len(dim.choices) - 1, levels).round().astype(int)
        return [dim.choices[i] for i in picks]
    if levels == 1:
        middle = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
        return [middle]
    values = np.geomspace(dim.low, dim.high, levels) if dim.log else np.linspace(dim.low, dim.high, levels)
    return [float(np.clip(v, dim.low, dim.high)) for v in values]  # no end rounded out of its own range


def grid_space(space: Mapping[str, Dim], levels: Mapping[str, int]) -> dict[str, list]:
    """The grid Optuna's `GridSampler` walks: `levels[name]` values for each gridded dimension."""
    unknown = sorted(set(levels) - set(space))
    if unknown:
        raise MfkitError(f"The grid names unknown dimension(s) {unknown}.", f"use names from {list(space)}.")
    return {name: grid_values(space[name], n) for name, n in levels.items()}


def grid_size(levels: Mapping[str, int]) -> int:
    """How many points a grid with these levels has: its trial budget."""
    return math.prod(levels.values())


# --------------------------------------------------------------------------------------------------------------
# The leakage guard


def _row_key(ids: Sequence[int]) -> bytes:
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).digest()


def _row_keys(table: Any) -> set[bytes]:
    return {_row_key(ids) for ids in table["input_ids"]}


class SearchSplits(Mapping):
    """The splits a search may read (train, validation). Asking for any other split raises `MfkitError`."""

    def __init__(self, splits: Mapping[str, Any]) -> None:
        self._splits = {name: splits[name] for name in SEARCH_SPLITS}

    def __getitem__(self, name: str) -> Any:
        if name not in self._splits:
            raise MfkitError(
                f"The search asked for the {name!r} split; a search sees only {list(SEARCH_SPLITS)}.",
                "choose hyperparameters on validation; score the winner on test once, after the search.",
            )
        return self._splits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)


def drop_test_copies(
    tokenized: Mapping[str, Any], test: str = "test"
) -> tuple[dict[str, Any], dict[str, int]]:
    """`tokenized` without the rows of train and validation whose token ids equal a row of `test`, and how many
    each split lost. After truncation two different mails can become the same input (a shared header, a forwarded
    newsletter): to the model that is the test mail itself, so it leaves the search data, and `test` keeps it."""
    held_out = _row_keys(tokenized[test])
    cleaned, dropped = dict(tokenized), {}
    for name in SEARCH_SPLITS:
        keys = [_row_key(ids) for ids in tokenized[name]["input_ids"]]
        keep = [i for i, key in enumerate(keys) if key not in held_out]
        dropped[name] = len(keys) - len(keep)
        if dropped[name]:
            cleaned[name] = tokenized[name].select(keep)
    return cleaned, dropped


def search_splits(tokenized: Mapping[str, Any], test: str = "test") -> SearchSplits:
    """Train and validation of `tokenized` behind the guard, after checking that no row of `test` (by its token
    ids) also sits in one of them: a search that saw a test mail would be tuned on the test set."""
    missing = [name for name in (*SEARCH_SPLITS, test) if name not in tokenized]
    if missing:
        raise MfkitError(
            f"The data has no {missing} split(s); it has {list(tokenized)}.", "load it with load_data."
        )
    held_out = _row_keys(tokenized[test])
    for name in SEARCH_SPLITS:
        shared = len(held_out & _row_keys(tokenized[name]))
        if shared:
            raise MfkitError(
                f"{shared} row(s) of the {test!r} split also sit in {name!r}: a search on it would see test mails.",
                "drop them with search.drop_test_copies(tokenized) (truncation can make two mails one input), "
                "or deduplicate across splits before splitting (notebook 01 does).",
            )
    return SearchSplits(tokenized)


# --------------------------------------------------------------------------------------------------------------
# Studies on disk


def knob_hash(knobs: Mapping[str, Any]) -> str:
    """A short hash of the knobs that shape a study: change one and the study gets a new name (a fresh start)."""
    text = json.dumps(knobs, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def finished(study: Any) -> list:
    """The trials that count towards the budget: completed or pruned."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def open_study(
    path: str | Path,
    kind: str,
    knobs: Mapping[str, Any],
    make_sampler: Callable[[int], Any],
    seed: int = 0,
    pruner: Any = None,
    direction: str = "maximize",
    resume: bool = True,
) -> Any:
    """The study `kind-<hash of knobs>` in the SQLite file `path`, created or, with `resume`, loaded as it stands.

    A trial still marked running was cut off by an interruption: it is marked failed and its parameters are
    queued again, so the rerun trains that point once more (a grid trial keeps its grid point, which the grid
    sampler would otherwise count as done). The sampler is built by `make_sampler(seed + n)`,
    n being the trials already in the study, so a resumed random or TPE search draws new points rather than
    repeating the first ones; a grid sampler keeps `seed`, which fixes the order of its points. `resume=False`
    deletes the study first.
    """
    import optuna
    from optuna.trial import TrialState

    check_choice("direction", direction, ("maximize", "minimize"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{path}"
    name = f"{kind}-{knob_hash(knobs)}"
    if not resume:
        with contextlib.suppress(KeyError):  # no such study yet
            optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(
        storage=storage, study_name=name, direction=direction, pruner=pruner, load_if_exists=True
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        grid_point = "grid_id" in trial.system_attrs
        if trial.params or grid_point:  # cut off after it drew its point: train that point again
            study.enqueue_trial(dict(trial.params), skip_if_exists=False)
        if grid_point:
            # GridSampler counts a failed trial's point as done: the queued trial takes the point over
            queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1]
            for key in ("grid_id", "search_space"):
                study._storage.set_trial_system_attr(queued._trial_id, key, trial.system_attrs[key])
    sampler = make_sampler(seed + len(study.trials))
    if isinstance(sampler, optuna.samplers.GridSampler):
        # its seed orders the grid points: another seed on resume would reorder them
        sampler = make_sampler(seed)
    study.sampler = sampler
    study.set_user_attr("knobs", json.loads(json.dumps(knobs, default=str)))
    return study


def _fixed_of(trial: Any) -> dict[str, Any]:
    return {k: v for k, v in trial.user_attrs.items() if k not in COSTS}


def run_study(study: Any, objective: Callable[[Any], float], budget: int, progress: bool = False) -> Any:
    """Run `objective` until `budget` trials have finished (completed or pruned), counting those already in the
    study: a rerun after an interruption runs only the rest."""
    import optuna

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MfkitError(
            f"budget={budget!r} is not a whole number of trials >= 1.", "pass the number of trials."
        )
    remaining = budget - len(finished(study))
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=remaining, show_progress_bar=progress, catch=())
    return study


# --------------------------------------------------------------------------------------------------------------
# Pruning, through fit's evaluations


class PruningReporter(Callback):
    """Report `metric` at every evaluation of `fit` as rung 1, 2, ... of `trial`, and stop training when the
    trial's pruner says so. Rungs, not steps: trials with other batch sizes run other numbers of steps, and the
    median pruner compares trials at the same reported step. The last of `rungs` evaluations is reported but
    never pruned: stopping there would save nothing and throw the finished trial's value away."""

    def __init__(self, trial: Any, rungs: int, metric: str = "eval_f1") -> None:
        self.trial = trial
        self.rungs = rungs
        self.metric = metric
        self.pruned = False

    def on_evaluate(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise MfkitError(
                f"{self.metric!r} is not among the metrics {sorted(metrics)}.", "report one of them."
            )
        rung = len(state.history.eval)
        self.trial.report(float(metrics[self.metric]), rung)
        if rung < self.rungs and self.trial.should_prune():
            self.pruned = state.should_stop = True


def trial_steps(examples: int, batch_size: int, rungs: int) -> int:
    """Optimizer steps for a trial that sees about `examples` training examples in batches of `batch_size`,
    rounded up to a multiple of `rungs` so that every evaluation falls on a whole step."""
    for name, value in (("examples", examples), ("batch_size", batch_size), ("rungs", rungs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MfkitError(
                f"{name}={value!r} is not a whole number >= 1.", f"pass {name} as a positive int."
            )
    return rungs * math.ceil(examples / (batch_size * rungs))


def trial_params(trial: Any) -> dict[str, Any]:
    """Everything a trial trained with: its searched parameters and the fixed ones `suggest` stored on it."""
    return {**_fixed_of(trial), **trial.params}


def record_cost(trial: Any, steps: int, examples: int, full_steps: int, seconds: float = 0.0) -> None:
    """Store what a trial ran (and would have run unpruned) on it, for `spent`."""
    trial.set_user_attr(COST_SECONDS, float(seconds))
    trial.set_user_attr(COST_STEPS, int(steps))
    trial.set_user_attr(COST_EXAMPLES, int(examples))
    trial.set_user_attr(FULL_STEPS, int(full_steps))


def spent(study: Any) -> dict[str, float]:
    """Trials, pruned trials, optimizer steps and training examples a study spent, the steps its pruned trials
    would have run to the end, and the share of that compute the pruner saved."""
    from optuna.trial import TrialState

    trials = finished(study)
    steps = sum(t.user_attrs.get(COST_STEPS, 0) for t in trials)
    full = sum(t.user_attrs.get(FULL_STEPS, t.user_attrs.get(COST_STEPS, 0)) for t in trials)
    return {
        "trials": len(trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "steps": steps,
        "examples": sum(t.user_attrs.get(COST_EXAMPLES, 0) for t in trials),
        "seconds": sum(t.user_attrs.get(COST_SECONDS, 0.0) for t in trials),
        "steps_unpruned": full,
        "saved_share": 1 - steps / full if full else 0.0,
    }


def best_so_far(study: Any, maximize: bool = True) -> list[float]:
    """The best finished value after each trial, in trial order (a pruned trial adds nothing new)."""
    from optuna.trial import TrialState

    best, curve = -math.inf if maximize else math.inf, []
    for trial in sorted(finished(study), key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            best = max(best, trial.value) if maximize else min(best, trial.value)
        curve.append(best if math.isfinite(best) else math.nan)
    return curve


def replay_pruner(trials: Sequence[Any], make_pruner: Callable[[], Any], direction: str = "maximize") -> dict:
    """Feed finished, unpruned trials' learning curves, in their order, to a fresh pruner: at which rung would it
    have stopped each (None: it would have run to the end)? No training: only the reported values are replayed."""
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, pruner=make_pruner())
    cut = {}
    for source in sorted(trials, key=lambda t: t.number):
        trial = study.ask({"x": FloatDistribution(0, 1)})
        cut[source.number] = None
        for rung, value in sorted(source.intermediate_values.items()):
            trial.report(value, rung)
            if trial.should_prune():
                cut[source.number] = rung
                break
        if cut[source.number] is None:
            study.tell(trial, source.value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return cut


def importances(trials: Sequence[Any], seed: int = 0) -> dict[str, float]:
    """fANOVA importance (Hutter et al., 2014) of each searched parameter over the completed `trials`: the share
    of the variance of the objective a random forest fitted to them attributes to that parameter alone (all zero
    when every trial scored the same)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        raise MfkitError(
            f"{len(complete)} completed trial(s) cannot rank parameters.", "run a few more trials."
        )
    if len({t.value for t in complete}) == 1:  # every trial scored the same: there is no variance to explain
        return dict.fromkeys(sorted({name for t in complete for name in t.params}), 0.0)
    study = optuna.create_study()
    study.add_trials(complete)
    return get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
