import pytest

from engram_shm.transport.credit import credit_for, level_of, retry_after_ms


@pytest.mark.parametrize("pressure,level", [(0.0, "normal"), (0.49, "normal"), (0.5, "warning"),
                                            (0.79, "warning"), (0.8, "critical"), (0.94, "critical"),
                                            (0.95, "overloaded"), (3.0, "overloaded")])
def test_four_levels(pressure, level):
    assert level_of(pressure) == level


def test_low_priority_loses_credit_first_and_high_last():
    C, minimal = 4096, 256
    table = {level: [credit_for(level, p, C, minimal) for p in ("high", "normal", "low")]
             for level in ("normal", "warning", "critical", "overloaded")}
    assert table["normal"] == [C, C, C]
    for level in ("warning", "critical"):
        high, normal, low = table[level]
        assert high >= normal >= low and high > low
    assert table["critical"][2] == 0 and table["critical"][1] == minimal
    assert table["overloaded"] == [0, 0, 0]
    levels = ["normal", "warning", "critical", "overloaded"]
    first_cut = {p: next(lv for lv in levels if table[lv][i] < C) for i, p in
                 enumerate(("high", "normal", "low"))}
    assert levels.index(first_cut["low"]) <= levels.index(first_cut["normal"]) \
        <= levels.index(first_cut["high"])


def test_retry_hint_grows_with_pressure():
    assert 50 <= retry_after_ms(0.95) < retry_after_ms(1.0) <= 500
