"""Selection over the tags: rules first (each drop counted by the rule that made it), then at most `select_max` rows
with a task-category policy, best first within a category.

Magpie's seed dataset "first selected 100K high-quality Magpie instructions with diverse task categories": the rules
are the quality bar, the category policy the diversity. Policies: `balanced` gives every category the same quota
(what a small category cannot fill goes to the others), `proportional` keeps the categories' shares of the rows that
passed the rules, `shares` takes the shares given (`select_category_shares`), again handing on what a category
cannot fill.
"""

from dataclasses import dataclass

from datasets import Dataset

from ..pipeline.stage import DROP_REASON, KEEP, TABLE, Stage
from .tags import ORDINAL, TASK_CATEGORY


POLICIES = ("balanced", "proportional", "shares")


@dataclass(frozen=True)
class SelectSettings:
    min_input_quality: str | None
    min_difficulty: str | None
    safe_only: bool
    languages: tuple[str, ...]
    min_neighbor_distance: float
    max_rows: int | None
    policy: str
    shares: tuple[tuple[str, float], ...]
    order: tuple[str, ...]


def rule_columns(settings: SelectSettings) -> tuple[str, ...]:
    """The columns the settings' rules and order read."""
    needed = {
        "input_quality": settings.min_input_quality is not None,
        "difficulty": settings.min_difficulty is not None,
        "safety": settings.safe_only,
        "language": bool(settings.languages),
        "min_neighbor_distance": settings.min_neighbor_distance > 0,
        TASK_CATEGORY.name: settings.max_rows is not None,
    }
    order = settings.order if settings.max_rows is not None else ()
    return tuple(dict.fromkeys([*(c for c, used in needed.items() if used), *order]))


def rule_verdict(row: dict, settings: SelectSettings) -> str:
    """KEEP, or `selection:<rule>` for the first rule the row fails."""
    if settings.min_input_quality is not None:
        levels = ORDINAL["input_quality"]
        if levels.index(row["input_quality"]) < levels.index(settings.min_input_quality):
            return "selection:input_quality"
    if settings.min_difficulty is not None:
        levels = ORDINAL["difficulty"]
        if levels.index(row["difficulty"]) < levels.index(settings.min_difficulty):
            return "selection:difficulty"
    if settings.safe_only and row["safety"] != "safe":
        return "selection:safety"
    if settings.languages and row["language"] not in settings.languages:
        return "selection:language"
    distance = row.get("min_neighbor_distance")
    if settings.min_neighbor_distance > 0 and distance is not None and distance < settings.min_neighbor_distance:
        return "selection:min_neighbor_distance"
    return KEEP


def quotas(available: dict[str, int], total: int, policy: str, shares: dict[str, float]) -> dict[str, int]:
    """Rows to take per category, at most `total` and never more than a category has.

    Each round hands the rows still to give out to the categories that can take more, in proportion to their
    weights (equal for `balanced`, their sizes for `proportional`, the given shares for `shares`), the odd rows by
    largest remainder (ties to the category first in sorted order, so the result is deterministic); what a full
    category cannot take goes round again.
    """
    if policy == "proportional":
        weights = {c: float(n) for c, n in available.items()}
    elif policy == "shares":
        weights = {c: shares.get(c, 0.0) for c in available}
    else:
        weights = dict.fromkeys(available, 1.0)
    taken = dict.fromkeys(available, 0)
    left = min(total, sum(available.values()))
    while left > 0:
        open_ = [c for c in sorted(available) if taken[c] < available[c] and weights[c] > 0]
        if not open_:
            break
        weight = sum(weights[c] for c in open_)
        exact = {c: left * weights[c] / weight for c in open_}
        given = {c: min(int(exact[c]), available[c] - taken[c]) for c in open_}
        rest = left - sum(given.values())
        for c in sorted(open_, key=lambda c: (int(exact[c]) - exact[c], c)):  # largest remainder first
            if rest and taken[c] + given[c] < available[c]:
                given[c], rest = given[c] + 1, rest - 1
        for c, n in given.items():
            taken[c] += n
        left -= sum(given.values())
    return taken


def sort_key(row: dict, order: tuple[str, ...]):
    """Best first: ordinal tags from their best label, numbers from the highest, text (uuid) ascending."""
    key = []
    for column in order:
        value = row[column]
        if column in ORDINAL:
            key.append(-ORDINAL[column].index(value))
        elif isinstance(value, (int, float)):
            key.append(-value)
        else:
            key.append(value)
    return key


def select_rows(rows: Dataset, *, settings: SelectSettings) -> Dataset:
    """Input columns: the ones the rules, the category policy and the order read. Output column: `drop_reason`
    (`selection:<rule>` or `selection:category_quota`)."""
    table = rows.select_columns(list(rule_columns(settings))).to_list()
    reasons = [rule_verdict(row, settings) for row in table]
    if settings.max_rows is not None:
        passed: dict[str, list[int]] = {}
        for i, reason in enumerate(reasons):
            if reason == KEEP:
                passed.setdefault(table[i][TASK_CATEGORY.name], []).append(i)
        taking = quotas(
            {c: len(v) for c, v in passed.items()}, settings.max_rows, settings.policy, dict(settings.shares)
        )
        for category, members in passed.items():
            ranked = sorted(members, key=lambda i: sort_key(table[i], settings.order))
            for i in ranked[taking[category] :]:
                reasons[i] = "selection:category_quota"
    return rows.add_column(DROP_REASON, reasons)


def parse_shares(entries: list[str]) -> tuple[tuple[str, float], ...]:
    """`["Math=0.3", "Coding & Debugging=0.2"]` -> (("Coding & Debugging", 0.2), ("Math", 0.3))."""
    shares = {}
    for entry in entries:
        category, sep, share = entry.rpartition("=")
        if not sep or category.strip() not in TASK_CATEGORY.labels:
            raise ValueError(
                f"`select_category_shares` entry {entry!r} is not <category>=<share> with one of Magpie's "
                f"categories ({', '.join(TASK_CATEGORY.labels)})."
            )
        shares[category.strip()] = float(share)
    return tuple(sorted(shares.items()))


def select(config) -> Stage:
    settings = SelectSettings(
        config.select_min_input_quality,
        config.select_min_difficulty,
        config.select_safe_only,
        tuple(config.select_languages),
        config.select_min_neighbor_distance,
        config.select_max,
        config.select_category_policy,
        parse_shares(config.select_category_shares),
        tuple(config.select_order),
    )
    reasons = (
        "selection:input_quality",
        "selection:difficulty",
        "selection:safety",
        "selection:language",
        "selection:min_neighbor_distance",
        "selection:category_quota",
    )
    return Stage(
        name="select",
        kind=TABLE,
        apply=select_rows,
        reads=rule_columns(settings),
        settings=settings,
        drop_reasons=reasons,
        if_none_left="loosen the select_* rules",
    )
