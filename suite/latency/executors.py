"""How the cells of a latency matrix run: one executor per mode, all with the same interface.

``bench.run`` checks the cells, groups them into launch units (``launch_units``) and hands each unit to the
executor of its mode (``EXECUTORS``, keyed by the provenances of ``suite.vocabulary``):

- ``check(cells)`` raises a one-line usage error, before any cell runs, for cells no run could execute;
- ``run(unit)`` runs the cells of one unit and appends one row per cell to the store as it finishes (a
  failed row naming the reason for a cell that fails; the other cells still run).

Measured cells run on N ranks launched together on one loaded model; projected cells run in this
process on the heaviest rank's shard, their collectives priced by an interconnect profile; simulated
ones on a virtual clock, in one worker process per CPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

from tqdm import tqdm

from suite.environment import environment
from suite.results import LatencyScenario, ResultStore, Row

AGREE_S = 30.0  # how long ranks that finished a cell wait for the others before a lone failure ends the launch


def latency_row(
    cell: LatencyScenario,
    values: dict | None = None,
    error: str | None = None,
    *,
    env: dict | None = None,
    command: str = "",
) -> Row:
    """One result row: the scenario, then the figures (or null figures and the error)."""
    return Row(
        scenario=cell,
        provenance=cell.provenance,
        usable_model=_usable(cell.strategy),
        status="failed" if error else "ok",
        error=error,
        values=values or {},
        env=env if env is not None else environment(),
        command=command,
    )


def _usable(name: str) -> bool:
    """Whether a strategy is a usable model (an unknown one is not known to be a bound)."""
    from suite.parallel.strategy import StrategyError, strategy_class

    try:
        return strategy_class(name).usable
    except StrategyError:
        return True


def launch_units(cells: list[LatencyScenario]) -> list[list[LatencyScenario]]:
    """Launch units: cells sharing (tp, device, backend, timeout, mode, profiles), each ordered so that
    one loaded model serves consecutive cells (model, dtype, then strategies that run their own)."""

    def unit_key(c):
        return c.tp, c.device, c.backend, c.timeout, c.mode, c.interconnect, c.device_profile

    from suite.parallel.strategy import make_strategy

    def model_order(c):
        return c.model, c.dtype, c.kernels, make_strategy(c.strategy, c.strategy_options).model_key() or ""

    units: dict = {}
    for c in cells:
        units.setdefault(unit_key(c), []).append(c)
    return [sorted(u, key=model_order) for u in units.values()]


@dataclass
class BenchRun:
    """What the executors of one run share: the store, the command and environment its rows record, progress."""

    store: ResultStore
    command: str
    env: dict
    main: bool  # this process writes the rows (under torchrun, rank 0 of every rank running the matrix)
    total: int  # cells in the matrix
    done: int = 0  # cells finished, failed or skipped so far

    def report(self, cell: LatencyScenario, error: str) -> None:
        """Record a cell that failed with ``error``."""
        if self.main:
            tqdm.write(f"bench: cell {cell.label()} failed: {error}", file=sys.stderr)
            self.store.append(latency_row(cell, error=error, env=self.env, command=self.command))


class Executor:
    """Runs the cells of one mode into the run's store."""

    mode: ClassVar[str]

    def __init__(self, bench: BenchRun):
        self.bench = bench

    def check(self, cells: list[LatencyScenario]) -> None:
        """Raise for cells of this mode that no run could execute (default: none)."""

    def run(self, unit: list[LatencyScenario]) -> None:
        """Run one launch unit's cells, appending a row per cell."""
        raise NotImplementedError


# ---------------------------------------------------------------- measured: N real ranks


def _unit_job(comm, device, cells, store_path, command, done, total):
    """On every rank: run the cells (same tp and device) in order; rank 0 stores each row.

    After each cell the ranks agree on its outcome: a cell that failed on every rank is recorded and
    the next one runs; a rank that failed alone records its cell and ends the launch (its peers'
    collectives break at once instead of waiting for their timeout).
    """
    from suite.latency.measure import measure_cell
    from suite.parallel import launch as launching
    from suite.parallel.runner import ModelCache
    from suite.parallel.strategy import bound_strategy

    main = comm.rank == 0
    store, env, models = ResultStore(store_path), environment(), ModelCache(device)
    control = launching.control_group(min(AGREE_S, cells[0].timeout))
    with tqdm(total=total, initial=done, disable=not main, desc="bench", unit="cell", file=sys.stderr) as bar:
        for cell in cells:
            bar.set_postfix_str(cell.label())
            values, error = None, None
            try:
                strategy = bound_strategy(cell.strategy, cell.strategy_options, models.source(cell.model), comm.world)
                values = measure_cell(
                    cell, models.runner(cell.model, cell.dtype, strategy, comm, cell.kernels), comm, device
                )
            except Exception as exc:
                error = f"{exc.__class__.__name__}: {exc}"
            try:
                error = launching.agree(control, error)
            except Exception as exc:  # it or a peer failed alone: record it here (rank 0 may end with the launch)
                store.append(latency_row(cell, error=f"rank {comm.rank}: {error or exc}", env=env, command=command))
                raise
            if main:
                store.append(latency_row(cell, values, error, env=env, command=command))
            bar.update()


class MeasuredExecutor(Executor):
    """Measured cells: one launch of N ranks per unit; a launch that a cell ends goes on with the rest."""

    mode = "measured"

    def _launch(self, cells: list[LatencyScenario], tp: int) -> None:
        from suite.parallel import launch as launching

        first, bench = cells[0], self.bench
        launching.launch(
            _unit_job,
            tp,
            cells,
            bench.store.path,
            bench.command,
            bench.done,
            bench.total,
            device=first.device,
            backend=first.backend,
            timeout_s=first.timeout,
        )

    def run(self, unit):
        store, todo = self.bench.store, unit
        while todo:
            written = len(store.all_rows())
            try:
                self._launch(todo, todo[0].tp)
                self.bench.done, todo = self.bench.done + len(todo), []
            except Exception as exc:  # the cell in progress failed: record it, go on with the rest
                finished = store.finished()
                failed = next((c for c in todo if c.cell_id not in finished), None)
                if failed is None:
                    raise
                if any(r["cell_id"] == failed.cell_id for r in store.all_rows()[written:]):  # rank 0 recorded it
                    tqdm.write(f"bench: cell {failed.label()} failed: {exc}", file=sys.stderr)
                else:
                    self.bench.report(failed, f"{exc.__class__.__name__}: {exc}")
                rest = [c for c in todo if c is not failed and c.cell_id not in finished]
                self.bench.done, todo = self.bench.done + len(todo) - len(rest), rest

    def run_under_torchrun(self, cells: list[LatencyScenario], world: int) -> None:
        """Under torchrun, one process group: the measured cells of its size and device, in one launch."""
        mine = [c for c in cells if c.mode == self.mode and c.tp == world]

        def place(c):
            return c.device, c.backend, c.timeout

        here = [c for c in mine if place(c) == place(mine[0])]
        if self.bench.main and len(here) < len(cells):
            tqdm.write(
                f"bench: under torchrun with {world} ranks, {len(cells) - len(here)} cells of other "
                f"tp, device or mode are left for another launch",
                file=sys.stderr,
            )
        if here:
            self._launch([c for u in launch_units(here) for c in u], world)


# ---------------------------------------------------------------- projected and simulated: in this process


class ModelledExecutor(Executor):
    """Cells whose collectives are modelled: ``cells(unit)`` yields ``(cell, values, error)`` in order."""

    def cells(self, unit):
        raise NotImplementedError

    def run(self, unit):
        bench = self.bench
        with tqdm(
            total=bench.total,
            initial=bench.done,
            disable=not bench.main,
            desc=f"bench ({self.mode})",
            unit="cell",
            file=sys.stderr,
        ) as bar:
            for cell, values, error in self.cells(unit):
                if error:
                    bench.report(cell, error)
                else:
                    bench.store.append(latency_row(cell, values, env=bench.env, command=bench.command))
                bar.update()
        bench.done += len(unit)


class ProjectedExecutor(ModelledExecutor):
    """Projected cells: the heaviest rank's shard in this process, its collectives' waits from the profile."""

    mode = "projected"

    def cells(self, unit):
        from suite.latency.projection import project_cells

        return project_cells(unit)


class SimulatedExecutor(ModelledExecutor):
    """Simulated cells: a virtual clock priced by device and interconnect profiles, one worker per CPU."""

    mode = "simulated"

    def check(self, cells):
        """Unknown profiles and strategies the simulation cannot express: usage errors."""
        from suite.latency.simulation import check_cells

        check_cells(cells)

    def cells(self, unit):
        from suite.latency.simulation import simulate_cells

        return simulate_cells(unit)


EXECUTORS: dict[str, type[Executor]] = {e.mode: e for e in (MeasuredExecutor, ProjectedExecutor, SimulatedExecutor)}
