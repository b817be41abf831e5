"""The one place that counts: rows in and out of every stage, drops by reason, time and tokens per stage."""

import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


logger = logging.getLogger("magpie_builder")


@dataclass
class StageRecord:
    name: str
    rows_in: int = 0
    rows_out: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0  # tokens generated (or scored, for rewards)
    notes: dict[str, int | float | str] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Ledger:
    stages: list[StageRecord] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str, rows_in: int):
        record = StageRecord(name, rows_in=rows_in)
        self.stages.append(record)  # at once, so an error inside the stage can report its drops
        start = time.perf_counter()
        yield record
        record.seconds = time.perf_counter() - start
        lost = record.rows_in - record.rows_out - sum(record.drops.values())
        if lost:
            raise RuntimeError(f"Stage {name} lost {lost} rows without a reason: {record}")
        logger.info(
            "%s: %d -> %d rows%s",
            name,
            record.rows_in,
            record.rows_out,
            f", dropped {dict(record.drops)}" if record.drops else "",
        )

    def drops(self) -> dict[str, int]:
        total: Counter = Counter()
        for record in self.stages:
            total.update(record.drops)
        return dict(total)

    def get(self, name: str) -> StageRecord:
        return next(record for record in self.stages if record.name == name)

    def to_dict(self) -> dict:
        return {
            "stages": [asdict(record) | {"tokens_per_second": record.tokens_per_second} for record in self.stages],
            "drops": self.drops(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = [f"{'stage':<14}{'rows in':>9}{'rows out':>10}{'seconds':>10}{'tokens':>10}{'tok/s':>9}  drops"]
        for r in self.stages:
            drops = ", ".join(f"{k}={v}" for k, v in r.drops.items()) or "-"
            notes = "".join(f"; {k}={v}" for k, v in r.notes.items())
            lines.append(
                f"{r.name:<14}{r.rows_in:>9}{r.rows_out:>10}{r.seconds:>10.2f}{r.tokens:>10}"
                f"{r.tokens_per_second:>9.1f}  {drops}{notes}"
            )
        lines.append(f"{'total':<14}{'':>19}{sum(r.seconds for r in self.stages):>10.2f}")
        return "\n".join(lines)
