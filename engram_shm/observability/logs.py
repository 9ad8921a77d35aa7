"""The one logging set-up of every process of the engine.

The CLI calls `configure(config, role)` once, and so does each child process
at its start with the config it was handed on its command line: `--log-level`
and `--log-format` (or ENGRAM_LOG_LEVEL, ENGRAM_LOG_FORMAT, the TOML file)
reach every process the same way as any other option.

One line per event. An event about a space, a session or an error code says
so with `extra=fields(space=..., session=..., code=...)`: a text line ends
with `space=... session=... code=...`, a JSON line carries them as keys
(with `time`, `level`, `logger`, `process`, `pid`, `message`, and `exception`
when there is one, its newlines escaped like any other).
"""

from __future__ import annotations

import json
import logging
import time

FIELDS = ("space", "session", "code")


def fields(**values) -> dict:
    """`extra=` for a log call: the event's space, session, code."""
    return {k: v for k, v in values.items() if v is not None}


def _context(record: logging.LogRecord) -> dict:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__(f"%(asctime)s {role}[%(process)d] %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        if not context:
            return line
        head, sep, trace = line.partition("\n")  # keep the context on the event's own line
        return f"{head} {context}{sep}{trace}"


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "process": self.role,
                "pid": record.process, "message": record.getMessage(), **_context(record)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(config, role: str) -> None:
    """Log at `config.log_level` in `config.log_format` to stderr, as `role`
    (serve, front, index-0, recall-1, ws-bridge, or a CLI command)."""
    handler = logging.StreamHandler()
    handler.setFormatter((JsonFormatter if config.log_format == "json" else TextFormatter)(role))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
