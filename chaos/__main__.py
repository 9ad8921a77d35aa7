"""The chaos suite (docs/chaos.md).

    python -m chaos list
    python -m chaos run SCENARIO [--seconds 20] [--seed S] [--bug FLAG] [--sample N] [--json]

`run` prints a summary (sent, acked, refused, retried, lost, duplicates,
visibility p99, each validator) and one JSON line, and exits 1 when a
validator fails. The seed is printed first: the same seed gives the same
fault schedule (its digest is in the summary), so a failure is repeated with
`--seed` (and `--bug`, if it ran with one).
"""

from __future__ import annotations

import argparse
import json
import random
import sys

from .run import BUGS, run
from .schedule import SCENARIOS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the scenarios and what each injects")
    r = sub.add_parser("run", help="run one scenario, validate, summarise")
    r.add_argument("scenario", choices=sorted(SCENARIOS))
    r.add_argument("--seconds", type=float, default=20.0, help="how long faults are injected (default 20)")
    r.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    r.add_argument("--bug", choices=sorted(BUGS), default=None,
                   help="switch on a deliberate bug in the server (test-only fault flag)")
    r.add_argument("--sample", type=int, default=2000,
                   help="acked ids recalled by their own vector (default 2000; 0: every one); every "
                        "acked id is checked stored with its own vector whatever the sample")
    r.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    if args.command == "list":
        width = max(map(len, SCENARIOS))
        for sc in SCENARIOS.values():
            print(f"{sc.name:<{width}}  {sc.doc}")
        print("\ndeliberate bugs (--bug): " + ", ".join(f"{b} (caught in {s})" for b, s in BUGS.items()))
        return 0
    seed = random.randrange(2**31) if args.seed is None else args.seed
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a: print(*a, flush=True))
    summary, checks = run(args.scenario, args.seconds, seed, args.bug, args.sample, log)
    if not args.json:
        print(f"sent {summary['sent']}, acked {summary['acked']}, refused {summary['refused']}, "
              f"retried {summary['retried']}, lost {summary['lost']}, duplicates {summary['duplicates']}, "
              f"visibility p99 {summary['visibility_p99_ms']} ms")
        print(f"faults: {summary['faults']}")
        for c in checks:
            print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.figures}")
            for problem in c.problems:
                print(f"       {problem}")
        print(("PASSED" if summary["ok"] else "FAILED") + f" {args.scenario} (seed {seed}; repeat with "
              f"python -m chaos run {args.scenario} --seconds {args.seconds:g} --seed {seed}"
              + (f" --bug {args.bug}" if args.bug else "") + ")")
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
