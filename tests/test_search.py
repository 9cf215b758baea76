"""mfkit.search: the leakage guard, resumable studies, equal budgets, pruning bookkeeping (no model trained)."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from datasets import Dataset, DatasetDict

from mfkit import search
from mfkit.errors import MfkitError

SPACE = search.space_from(
    {"lr": [1e-4, 1e-2, "log"], "warmup": [0.0, 0.3], "batch_size": {"choices": [8, 16, 32]}}
)


def _objective(space, fixed=None, calls=None):
    """A cheap objective with a known optimum (lr = 1e-3), reporting three rungs like a real trial."""

    def objective(trial):
        params = search.suggest(trial, space, fixed)
        if calls is not None:
            calls.append(params)
        import math

        value = 1 - abs(math.log10(params["lr"]) + 3) / 2 - params["warmup"]
        for rung in (1, 2, 3):
            trial.report(value * rung / 3, rung)
            if trial.should_prune():
                search.record_cost(trial, steps=10 * rung, examples=160 * rung, full_steps=30)
                raise optuna.TrialPruned()
        search.record_cost(trial, steps=30, examples=480, full_steps=30)
        return value

    return objective


def _tokenized(test_rows):
    def table(rows):
        return Dataset.from_dict({"input_ids": rows, "labels": [0] * len(rows)})

    return DatasetDict(
        train=table([[1, 2, 3], [4, 5], [6]]), validation=table([[7, 8]]), test=table(test_rows)
    )


def test_search_splits_hide_the_test_split():
    splits = search.search_splits(_tokenized([[9, 9], [10]]))
    assert sorted(splits) == ["train", "validation"]
    assert len(splits["train"]) == 3
    with pytest.raises(MfkitError, match="'test' split"):
        splits["test"]


def test_search_splits_refuse_test_rows_inside_the_search_data():
    with pytest.raises(MfkitError, match="also sit in 'train'"):
        search.search_splits(_tokenized([[9, 9], [4, 5]]))  # [4, 5] is a training row


def test_drop_test_copies_removes_them_from_the_search_data_only():
    tokenized = _tokenized([[9, 9], [4, 5], [7, 8]])  # [4, 5] is a training row, [7, 8] a validation row
    cleaned, dropped = search.drop_test_copies(tokenized)
    assert dropped == {"train": 1, "validation": 1}
    assert cleaned["train"]["input_ids"] == [[1, 2, 3], [6]] and len(cleaned["validation"]) == 0
    assert len(cleaned["test"]) == 3 and len(tokenized["train"]) == 3  # test kept whole, the input untouched
    assert sorted(search.search_splits(cleaned)) == ["train", "validation"]  # now the guard lets it through


def test_objective_that_reads_test_rows_fails_the_study(tmp_path):
    splits = search.search_splits(_tokenized([[9, 9]]))
    study = search.open_study(tmp_path / "s.db", "leak", {"a": 1}, lambda s: optuna.samplers.RandomSampler(s))

    def objective(trial):
        return float(len(splits["test"]))

    with pytest.raises(MfkitError, match="sees only"):
        search.run_study(study, objective, budget=2)


def test_grid_and_random_studies_run_exactly_their_budget(tmp_path):
    levels = {"lr": 3, "batch_size": 2}
    grid = search.grid_space(SPACE, levels)
    assert grid["lr"] == pytest.approx([1e-4, 1e-3, 1e-2]) and grid["batch_size"] == [8, 32]
    budget = search.grid_size(levels)
    study = search.open_study(
        tmp_path / "s.db", "grid", {"g": levels}, lambda s: optuna.samplers.GridSampler(grid, seed=s)
    )
    search.run_study(study, _objective(SPACE, fixed={"warmup": 0.1}), budget)
    points = {(t.params["lr"], t.params["batch_size"]) for t in study.trials}
    assert len(study.trials) == budget == len(points) == 6  # every grid point once
    assert all(search.trial_params(t)["warmup"] == 0.1 for t in study.trials)
    random = search.open_study(
        tmp_path / "s.db", "random", {"r": 1}, lambda s: optuna.samplers.RandomSampler(seed=s)
    )
    search.run_study(random, _objective(SPACE), budget)
    assert len(search.finished(random)) == budget
    assert len({t.params["lr"] for t in random.trials}) == budget


def test_interrupted_study_resumes_to_the_budget_without_duplicates(tmp_path):
    path, knobs = tmp_path / "studies.db", {"budget": 6, "space": "x"}

    def sampler(seed):
        return optuna.samplers.RandomSampler(seed=seed)

    first = search.open_study(path, "random", knobs, sampler, seed=3)
    search.run_study(first, _objective(SPACE), budget=2)
    interrupted = first.ask()  # the process dies inside the third trial: it stays RUNNING in the file
    interrupted_params = search.suggest(interrupted, SPACE)
    calls = []
    resumed = search.open_study(path, "random", knobs, sampler, seed=3)
    assert resumed.study_name == first.study_name
    search.run_study(resumed, _objective(SPACE, calls=calls), budget=6)
    done = search.finished(resumed)
    assert len(done) == 6 and len(calls) == 4  # only the missing trials ran
    assert calls[0] == interrupted_params  # the cut-off point is trained again, first
    assert len({t.params["lr"] for t in done}) == 6  # no point drawn twice
    again = search.open_study(path, "random", knobs, sampler, seed=3)
    search.run_study(again, _objective(SPACE, calls=calls), budget=6)
    assert len(calls) == 4  # a finished study runs nothing more
    other = search.open_study(path, "random", {**knobs, "budget": 7}, sampler, seed=3)
    assert other.study_name != first.study_name and len(other.trials) == 0


def test_interrupted_grid_study_trains_the_cut_off_point_and_the_rest(tmp_path):
    levels = {"lr": 4}
    grid = search.grid_space(SPACE, levels)

    def sampler(seed):
        return optuna.samplers.GridSampler(grid, seed=seed)

    first = search.open_study(tmp_path / "s.db", "grid", levels, sampler)
    search.run_study(first, _objective(SPACE, fixed={"warmup": 0.1, "batch_size": 8}), budget=1)
    interrupted = first.ask()  # the process dies inside the second trial
    cut_off = search.suggest(interrupted, SPACE, {"warmup": 0.1, "batch_size": 8})["lr"]
    resumed = search.open_study(tmp_path / "s.db", "grid", levels, sampler)
    search.run_study(resumed, _objective(SPACE, fixed={"warmup": 0.1, "batch_size": 8}), budget=4)
    done = search.finished(resumed)
    assert sorted(t.params["lr"] for t in done) == pytest.approx(sorted(grid["lr"]))  # each point once
    assert cut_off in [t.params["lr"] for t in done]


def test_resume_false_starts_afresh(tmp_path):
    def sampler(seed):
        return optuna.samplers.RandomSampler(seed=seed)

    study = search.open_study(tmp_path / "s.db", "r", {}, sampler)
    search.run_study(study, _objective(SPACE), budget=2)
    fresh = search.open_study(tmp_path / "s.db", "r", {}, sampler, resume=False)
    assert len(fresh.trials) == 0


def test_pruning_bookkeeping_counts_the_steps_pruned_trials_ran(tmp_path):
    study = search.open_study(
        tmp_path / "s.db",
        "tpe",
        {},
        lambda s: optuna.samplers.RandomSampler(seed=s),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    search.run_study(study, _objective(SPACE), budget=12)
    cost = search.spent(study)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert cost["trials"] == 12 and cost["pruned"] == len(pruned) > 0
    assert cost["steps"] == 30 * (12 - len(pruned)) + sum(t.user_attrs["steps"] for t in pruned)
    assert cost["steps_unpruned"] == 30 * 12
    assert cost["saved_share"] == pytest.approx(1 - cost["steps"] / (30 * 12))
    curve = search.best_so_far(study)
    assert len(curve) == 12 and all(b >= a for a, b in zip(curve, curve[1:], strict=False))


def test_pruning_reporter_stops_fit_and_replay_agrees():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    for rung, value in ((1, 0.8), (2, 0.9)):
        good.report(value, rung)
    study.tell(good, 0.9)
    bad = study.ask()
    reporter = search.PruningReporter(bad, rungs=2)
    state = SimpleNamespace(history=SimpleNamespace(eval=[{"eval_f1": 0.1}]), should_stop=False)
    reporter.on_evaluate(state, {"eval_f1": 0.1})
    assert reporter.pruned and state.should_stop
    cut = search.replay_pruner(
        [
            SimpleNamespace(number=0, intermediate_values={1: 0.8, 2: 0.9}, value=0.9),
            SimpleNamespace(number=1, intermediate_values={1: 0.1, 2: 0.95}, value=0.95),
        ],
        lambda: optuna.pruners.MedianPruner(n_startup_trials=1),
    )
    assert cut == {0: None, 1: 1}  # the late bloomer would have been cut at the first rung


def test_bad_space_and_budget_are_clear_errors():
    with pytest.raises(MfkitError, match="not a valid range"):
        search.space_from({"lr": [0, 1, "log"]})
    with pytest.raises(MfkitError, match="neither a range"):
        search.space_from({"lr": "fast"})
    with pytest.raises(MfkitError, match="at most 3 levels"):
        search.grid_space(SPACE, {"batch_size": 4})
    with pytest.raises(MfkitError, match="unknown dimension"):
        search.grid_space(SPACE, {"momentum": 2})
    with pytest.raises(MfkitError, match="budget"):
        search.run_study(optuna.create_study(), lambda t: 0.0, budget=0)


def test_importances_rank_the_parameter_that_matters():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective(SPACE), n_trials=30)
    ranked = search.importances(study.trials)
    assert set(ranked) == {"lr", "warmup", "batch_size"}
    assert max(ranked, key=ranked.get) == "lr"


def test_trial_steps_give_equal_examples_and_whole_rungs():
    assert search.trial_steps(384, 16, 3) == 24
    assert search.trial_steps(384, 32, 3) == 12
    assert search.trial_steps(384, 8, 3) == 48
    assert search.trial_steps(100, 16, 3) % 3 == 0
    with pytest.raises(MfkitError, match="rungs"):
        search.trial_steps(100, 16, 0)


def test_last_rung_is_never_pruned():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    good.report(0.9, 1)
    study.tell(good, 0.9)
    bad = study.ask()
    reporter = search.PruningReporter(bad, rungs=1)
    state = SimpleNamespace(history=SimpleNamespace(eval=[{"eval_f1": 0.1}]), should_stop=False)
    reporter.on_evaluate(state, {"eval_f1": 0.1})
    assert not reporter.pruned and not state.should_stop


def test_importances_of_a_flat_objective_are_zero():
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: search.suggest(trial, SPACE) and 0.5, n_trials=4)
    assert search.importances(study.trials) == {"batch_size": 0.0, "lr": 0.0, "warmup": 0.0}
