"""Pressure levels and the credit each priority class gets at each level
(docs/protocol.md, "Credit and backpressure")."""

from __future__ import annotations

LEVELS = ("normal", "warning", "critical", "overloaded")
THRESHOLDS = (0.5, 0.8, 0.95)  # pressure below each bound -> LEVELS[i]

# Share of max_credit per level for (high, normal, low); None = one batch.
_SHARES = {
    "normal": (1.0, 1.0, 1.0),
    "warning": (1.0, 0.5, 0.125),
    "critical": (0.25, None, 0.0),
    "overloaded": (0.0, 0.0, 0.0),
}
_PRIORITY = {"high": 0, "normal": 1, "low": 2}


def level_of(pressure: float) -> str:
    for bound, level in zip(THRESHOLDS, LEVELS):
        if pressure < bound:
            return level
    return "overloaded"


def credit_for(level: str, priority: str, max_credit: int, min_credit: int) -> int:
    """Observations a session of `priority` may send beyond its last ack."""
    share = _SHARES[level][_PRIORITY[priority]]
    return min_credit if share is None else int(max_credit * share)


def retry_after_ms(pressure: float) -> int:
    """A back-off hint for overloaded senders, longer the fuller the window."""
    return int(50 + 450 * min(1.0, max(0.0, (pressure - THRESHOLDS[-1]) / (1 - THRESHOLDS[-1]))))
