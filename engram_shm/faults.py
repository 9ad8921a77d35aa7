"""Test-only fault flags: deliberate bugs and storage faults that the chaos
suite (chaos/, docs/chaos.md) injects to prove its validators can fail.

Read once, when this module is first imported, from the environment variable
ENGRAM_TEST_FAULTS: a comma-separated list of flags and `name=value` pairs.

| flag                   | effect (in the process that reads it)                             |
|------------------------|-------------------------------------------------------------------|
| `ack_before_wal`       | the log record of a batch is written only when the next record is: |
|                        | the batch is acked before its record reaches the log (a bug)       |
| `drop_one`             | the front stores one batch without its last observation, and acks |
|                        | it whole (a bug; once per front process, after 1,000 observations)|
| `skip_reverse_links`   | index workers add no reverse links, pinned ones included (a bug)   |
| `slow_fsync_ms=N`      | every fsync of the log first sleeps N ms (a slow disk)              |
| `fail_write_every=N`   | every Nth log write fails with EIO after writing part of its record |

Never set it in production: with the variable unset every flag is a false
or zero module constant, checked by a plain attribute read on its path.
"""

from __future__ import annotations

import os

ENV = "ENGRAM_TEST_FAULTS"
FLAGS = ("ack_before_wal", "drop_one", "skip_reverse_links")
VALUES = ("slow_fsync_ms", "fail_write_every")


def parse(text: str) -> dict[str, int]:
    """{flag: 1 or value} from ENGRAM_TEST_FAULTS's syntax; unknown names
    raise ValueError (a typo must not silently test nothing)."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name in FLAGS and not value:
            out[name] = 1
        elif name in VALUES and value:
            out[name] = int(value)
        else:
            raise ValueError(f"{ENV}: unknown or malformed fault {item!r} "
                             f"(flags {', '.join(FLAGS)}; values {', '.join(v + '=N' for v in VALUES)})")
    return out


_ACTIVE = parse(os.environ.get(ENV, ""))
ACK_BEFORE_WAL = bool(_ACTIVE.get("ack_before_wal"))
DROP_ONE = bool(_ACTIVE.get("drop_one"))
SKIP_REVERSE_LINKS = bool(_ACTIVE.get("skip_reverse_links"))
SLOW_FSYNC_S = _ACTIVE.get("slow_fsync_ms", 0) / 1000
FAIL_WRITE_EVERY = _ACTIVE.get("fail_write_every", 0)
ANY = bool(_ACTIVE)
