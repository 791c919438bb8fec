"""``spdbench eval``: lm-eval's tasks on local data through the TP model, one ``accuracy`` row per task and metric."""

from __future__ import annotations

from pathlib import Path

from suite.accuracy.tasks import TaskDataError, converted
from suite.environment import environment
from suite.results import AccuracyScenario, ResultStore, Row


def parse_limits(values: list[str], names: list[str]) -> tuple[int | None, dict[str, int]]:
    """``K`` / ``TASK=K`` limit values -> (default documents per task, per-task documents)."""
    default, per_task = None, {}
    for value in values:
        task, sep, count = value.rpartition("=")
        if sep and task not in names:
            raise TaskDataError(f"limit {value}: task {task!r} is not in tasks")
        if not count.isdigit() or int(count) < 1:
            raise TaskDataError(f"limit {value} is invalid: expected a count of at least 1 (K or TASK=K)")
        if sep:
            per_task[task] = int(count)
        else:
            default = int(count)
    return default, per_task


def _samples(limits: dict, names: list[str], per_task: dict, folder) -> dict | None:
    """lm-eval ``samples`` (the first K documents of each task) when tasks differ in their limit."""
    if not per_task:
        return None
    if folder is None:
        raise TaskDataError("limit TASK=K needs local data (data_dir); with the Hub use one limit K")
    samples = {}
    for task in names:  # the first K documents, as a plain limit K takes them
        n_docs = converted(task, folder).read_text().count("\n")
        samples[task] = list(range(min(limits[task] or n_docs, n_docs)))
    return samples


def accuracy_rows(
    results: dict, scenario: dict, limits: dict, *, usable: bool, describe: dict, env: dict, command: str
) -> list[Row]:
    """lm-eval's results -> one row per task and metric."""
    rows = []
    for task, values in results["results"].items():
        for metric in results["higher_is_better"][task]:
            value, stderr = values.get(f"{metric},none"), values.get(f"{metric}_stderr,none")
            if not isinstance(value, (int, float)):
                continue
            cell = AccuracyScenario(**scenario, task=task, metric=metric, limit=limits.get(task))
            rows.append(
                Row(
                    scenario=cell,
                    usable_model=usable,
                    env=env,
                    command=command,
                    values={
                        "value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                        **describe,
                    },
                )
            )
    return rows


def evaluate(
    model: str,
    tp: int,
    configs: list[tuple[str, dict, str]],
    names: list[str],
    limits: list[str],
    folder,
    out: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    kernels: str = "eager",
    backend: str = "auto",
    timeout: float = 300,
    batch_size: int = 32,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
) -> list[list[Row]]:
    """Evaluate each (strategy, options, command) configuration on the tasks not yet in ``out`` and append
    their rows; returns every row of each configuration (re-running resumes). One launch of ``tp`` ranks
    serves every configuration (a model shared by several strategies is loaded once) and lm-eval's task
    objects are built once. ``folder`` is the local data folder (None: the Hub)."""
    import lm_eval

    from suite.accuracy.lm_eval_model import SpdbenchLM
    from suite.accuracy.tasks import task_configs

    default, per_task = parse_limits(limits, names)
    task_limits = {task: per_task.get(task, default) for task in names}
    samples = _samples(task_limits, names, per_task, folder)
    store = ResultStore(out)
    scenarios = [
        dict(
            model=model,
            strategy=strategy,
            strategy_options=options,
            tp=tp,
            dtype=dtype,
            data=str(folder) if folder else "hub",
        )
        for strategy, options, _ in configs
    ]

    def mine(scenario: dict) -> list[dict]:
        return [
            r
            for r in store.rows()
            if r.get("kind") == "accuracy"
            and r.get("task") in names
            and all(r.get(k) == v for k, v in scenario.items())
        ]

    todo = [
        [
            t
            for t in names
            if t
            not in {
                r["task"]
                for r in mine(scenario)
                if r.get("status") == "ok" and r.get("limit") == task_limits.get(r["task"])
            }
        ]
        for scenario in scenarios
    ]
    if any(todo):
        needed = sorted({t for tasks in todo for t in tasks}, key=names.index)
        specs, manager = task_configs(needed, folder)
        built = dict(zip(needed, specs)) | {
            name: task for name, task in manager.load(specs)["tasks"].items() if name in needed
        }  # a group (Hub) stays a spec, built per call
        lm = None
        try:
            for (strategy, options, command), scenario, tasks in zip(configs, scenarios, todo):
                if not tasks:
                    continue
                if lm is None:
                    lm = SpdbenchLM(
                        model=model,
                        tp=tp,
                        strategy=strategy,
                        dtype=dtype,
                        device=device,
                        kernels=kernels,
                        backend=backend,
                        timeout=timeout,
                        batch_size=batch_size,
                        max_length=max_length,
                        **options,
                    )
                else:
                    lm.use(strategy, options)
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[built[t] for t in tasks],
                    task_manager=manager,
                    samples={t: samples[t] for t in tasks} if samples else None,
                    limit=None if samples else default,
                    bootstrap_iters=bootstrap_iters,
                    verbosity="WARNING",
                )
                store.append(
                    *accuracy_rows(
                        results,
                        scenario,
                        task_limits,
                        usable=lm.strategy.usable,
                        describe=lm.strategy.describe(),
                        env=environment(),
                        command=command,
                    )
                )
        finally:
            if lm is not None:
                lm.close()
    return [[Row.from_json(r) for r in mine(scenario)] for scenario in scenarios]
