"""The report's smoke test: every subcommand's --quick run (shared with its
own test) carries the common fields, and `python -m bench report` writes a
document with every section, its tables and its plots from them."""

import json
import os
import subprocess
import sys

from bench import sections

from benchruns import quick

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_subcommand_quick_run_feeds_the_report(tmp_path):
    for section in sections.SECTIONS:
        out, rows = quick(section.name)
        assert rows, f"{section.name} --quick printed no JSON lines:\n{out}"
        for row in rows:
            assert row["bench"] == section.name and row["machine"] and row["date"].startswith("20"), row
        argv = ["python", "-m", "bench", section.name, "--quick"]
        head = {"bench": "command", "argv": argv, "seconds": 1.0}
        (tmp_path / f"{section.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [head, *rows]))
    report = tmp_path / "benchmarks.md"
    printed = subprocess.run([sys.executable, "-m", "bench", "report", "--render-only", "--results",
                              str(tmp_path), "--out", str(report)], capture_output=True, text=True,
                             timeout=300, check=True).stdout
    names = [s.name for s in sections.SECTIONS]
    assert printed.strip().endswith(", ".join(names)), printed
    text = report.read_text()
    for section in sections.SECTIONS:
        assert f"## {section.title}" in text
        assert f"`python -m bench {section.name} --quick`" in text
        assert f"![{section.title}]({section.name}.png)" in text
        with open(tmp_path / f"{section.name}.png", "rb") as f:
            assert f.read(8) == PNG
    # every table has a header rule and at least one row of figures
    tables = [block for block in text.split("\n\n") if block.startswith("| ")]
    assert len(tables) >= len(names) and all(block.count("\n") >= 2 for block in tables)


def test_report_refuses_an_unknown_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "report", "--only", "nosuch", "--results",
                           str(tmp_path), "--out", str(tmp_path / "b.md")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown benchmarks ['nosuch']" in proc.stderr
    assert not os.listdir(tmp_path)


def test_bench_without_a_subcommand_lists_them():
    proc = subprocess.run([sys.executable, "-m", "bench"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    for section in sections.SECTIONS:
        assert f"  {section.name}" in proc.stdout
    assert "  report" in proc.stdout
