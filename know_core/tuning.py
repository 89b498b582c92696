"""Learning-rate tuning that brackets its optimum (method.md §6, issue 11).

A tuned row (`naive-lr`, `know-lr`, `official-lr`) picks its phase-2 lr on a validation split.
A grid whose best value sits at an edge has not found the optimum, only a bound on it, so
:func:`bracket_search` extends the grid by a factor (×2 by default) past that edge and scores
the new value, until the best lr is interior or `max_extend` extensions were made on that side
(the cap).  Every start point is tuned by the same rule, so the comparison of tuned rows is
fair: the question becomes whether KNOW beats naive after both are tuned.

Pure logic: the caller scores a list of learning rates (one fine-tune each, in parallel if it
likes) and gets back a :class:`TuneResult`.

    >>> curve = lambda lr: -abs(lr - 7e-3)          # the optimum is above the grid
    >>> res = bracket_search([1e-3, 2e-3], lambda lrs: {lr: curve(lr) for lr in lrs})
    >>> res.best, res.interior, res.tried
    (0.008, True, [0.001, 0.002, 0.004, 0.008, 0.016])
    >>> res.describe()
    'grid 0.001, 0.002 extended to 0.001, 0.002, 0.004, 0.008, 0.016; best 0.008 (interior)'
    >>> edge = bracket_search([1e-3], lambda lrs: {lr: lr for lr in lrs}, max_extend=2)
    >>> edge.best, edge.interior, edge.describe()
    (0.004, False, 'grid 0.001 extended to 0.0005, 0.001, 0.002, 0.004; best 0.004 (at the upper edge after the cap of 2 extensions)')
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import BadInput


@dataclass
class TuneResult:
    grid: list[float]  # the grid asked for
    scores: dict[float, float] = field(default_factory=dict)  # every lr tried -> validation score
    max_extend: int = 3
    factor: float = 2.0

    @property
    def tried(self) -> list[float]:
        return sorted(self.scores)

    @property
    def best(self) -> float:
        """The lr with the highest score (ties: the smallest such lr); NaN scores never win."""
        finite = {lr: s for lr, s in self.scores.items() if math.isfinite(s)}
        if not finite:
            raise BadInput(f"every learning rate tried ({_fmt(self.tried)}) gave a non-finite validation score")
        top = max(finite.values())
        return min(lr for lr, s in finite.items() if s == top)

    @property
    def best_score(self) -> float:
        return self.scores[self.best]

    @property
    def interior(self) -> bool:
        """True when a smaller and a larger lr were tried and both scored worse than the best."""
        t = self.tried
        return t[0] < self.best < t[-1]

    def edge(self) -> str:
        """'' when interior, else 'upper' or 'lower'."""
        if self.interior:
            return ""
        return "upper" if self.best == self.tried[-1] else "lower"

    def describe(self) -> str:
        text = f"grid {_fmt(self.grid)}"
        if self.tried != sorted(self.grid):
            text += f" extended to {_fmt(self.tried)}"
        where = "interior" if self.interior else (
            f"at the {self.edge()} edge after the cap of {self.max_extend} extensions")
        return f"{text}; best {self.best:g} ({where})"


def _fmt(lrs: Sequence[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in lrs)


def bracket_search(
    grid: Sequence[float],
    score: Callable[[list[float]], dict[float, float]],
    factor: float = 2.0,
    max_extend: int = 3,
) -> TuneResult:
    """Score `grid`, then extend past the best edge by `factor` until the best is interior.

    `score(lrs)` returns {lr: validation score} for each lr asked (higher is better).  At most
    `max_extend` values are added above the grid and at most `max_extend` below it.  A grid of
    one value is extended on both sides at once.  Learning rates are rounded to 6 significant
    digits, so 1e-3·2·2 and 4e-3 are the same value.
    """
    if not grid:
        raise BadInput("the learning-rate grid is empty; give at least one value")
    if factor <= 1:
        raise BadInput(f"the grid's extension factor must be above 1, got {factor}")
    res = TuneResult(sorted({_round(lr) for lr in grid}), max_extend=max_extend, factor=factor)
    ups = downs = 0
    todo = list(res.grid)
    while todo:
        res.scores.update({_round(lr): float(s) for lr, s in score(todo).items()})
        todo = []
        if res.interior:
            break
        best, tried = res.best, res.tried
        if best == tried[-1] and ups < max_extend:
            todo.append(_round(best * factor))
            ups += 1
        if best == tried[0] and downs < max_extend:
            todo.append(_round(best / factor))
            downs += 1
        todo = [lr for lr in todo if lr not in res.scores]
    return res


def _round(lr: float) -> float:
    return float(f"{lr:.6g}")


__all__ = ["TuneResult", "bracket_search"]
