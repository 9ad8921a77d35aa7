"""Each benchmark's --quick run, once per test session: the subcommand's own
tests and the report's smoke test share it."""

import functools
import json
import subprocess
import sys


@functools.cache
def quick(subcommand: str, *flags: str) -> tuple[str, list[dict]]:
    """`python -m bench SUBCOMMAND --quick FLAGS`: (what it printed, its JSON lines)."""
    out = subprocess.run([sys.executable, "-m", "bench", subcommand, "--quick", *flags], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    return out, [json.loads(line) for line in out.splitlines() if line.startswith("{")]
