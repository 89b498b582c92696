"""Method names and their controls: which rows a KNOW run compares, and in what order.

Plain names, no tables, so that the stage settings (params/) can check a `methods` list
without importing pandas: a prediction process never needs it (docs/performance.md, the
1B prediction's memory). ``know_core.stats`` uses these rules and re-exports them.
"""
from __future__ import annotations

#: controls and the factor their rows are taken at (None: the same factor as the method).
#: "shrink" stands for each row's OWN shrink control (:func:`own_shrink`), not for the
#: method literally called "shrink"; the other names are fixed control methods.
CONTROLS: dict[str, float | None] = {"naive": 1.0, "naive-lr": 1.0, "shrink": None}

#: the key of :data:`CONTROLS` that is resolved per row by :func:`own_shrink`
OWN_SHRINK = "shrink"

#: control methods (besides every name starting with "shrink"): they have no shrink control
CONTROL_METHODS = frozenset({"naive", "naive-lr", "naive-full", "scratch"})

#: display/sort order, each predictor next to its own shrink control; unknown methods come
#: after these, alphabetically
METHOD_ORDER = (
    "scratch",
    "naive",
    "naive-lr",
    "naive-full",
    "taskvector",
    "shrink-taskvector",
    "logfit",
    "shrink-logfit",
    "know-s2",
    "shrink-know-s2",
    "know-s3",
    "shrink-know-s3",
    "know-s4",
    "shrink-know-s4",
    "know",
    "shrink",
    "know-lr",
    "official",
    "shrink-official",
    "official-lr",
)


def own_shrink(method: str) -> str | None:
    """The shrink control that belongs to ``method`` (Θ0 scaled per tensor towards that
    predictor's prediction, method.md §6), or None when it has none.

    ``know`` -> ``shrink``; ``official`` -> ``shrink-official``; any other predictor p
    (taskvector, logfit, know-s<k>, unknown names) -> ``shrink-<p>``.  Controls (naive,
    naive-lr, naive-full, scratch, anything starting with "shrink") have none, and neither do
    tuned rows ending in "-lr" (know-lr, official-lr): their shrink control would be an
    untuned start, so comparing a tuned row with it would not be fair.

    >>> [own_shrink(m) for m in ("know", "official", "taskvector", "know-s3", "my-predictor")]
    ['shrink', 'shrink-official', 'shrink-taskvector', 'shrink-know-s3', 'shrink-my-predictor']
    >>> [own_shrink(m) for m in ("naive", "naive-lr", "naive-full", "scratch", "shrink",
    ...                          "shrink-official", "know-lr", "official-lr")]
    [None, None, None, None, None, None, None, None]
    """
    method = str(method)
    if method in CONTROL_METHODS or method.startswith("shrink") or method.endswith("-lr"):
        return None
    if method == "know":
        return "shrink"
    return f"shrink-{method}"


def method_rank(method: str) -> int:
    try:
        return METHOD_ORDER.index(method)
    except ValueError:
        return len(METHOD_ORDER)


__all__ = ["CONTROLS", "OWN_SHRINK", "CONTROL_METHODS", "METHOD_ORDER", "own_shrink", "method_rank"]
