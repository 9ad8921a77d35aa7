"""The access list: which client key may do what in which spaces.

    # KEYS/acl.toml
    [grants.alice]
    "team-a/*" = ["observe", "recall"]   # every space whose name starts with team-a/
    "shared"   = ["recall"]              # exactly the space named shared

    [grants.ops]
    "*" = ["admin"]                      # every space, and engine-wide operations

    [limits.alice]                       # per-key limits (engram_shm/limits.py KeyLimits)
    sessions = 16
    quota_bytes = 1073741824

Rights: `observe` (store observations, creating the space), `recall`, and
`admin`, which implies both and, granted on "*", allows the engine-wide
operations (checkpoint). Rights of every matching pattern add up; a key with
no table holds nothing. A pattern is an exact space name or a prefix ending
in "*"; a "*" anywhere else is refused, so a typo never grants more than meant.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass

from ..errors import Forbidden, InvalidArgument
from ..limits import KeyLimits
from .keys import check_name

RIGHTS = ("observe", "recall", "admin")
ENGINE = "*"  # the pattern that grants engine-wide operations with admin


@dataclass(frozen=True)
class Grant:
    pattern: str
    rights: frozenset[str]

    def matches(self, space: str) -> bool:
        if self.pattern.endswith("*"):
            return space.startswith(self.pattern[:-1])
        return space == self.pattern


class Acl:
    def __init__(self, grants: dict[str, tuple[Grant, ...]], limits: dict[str, dict] | None = None):
        self.grants = grants
        self.limits = limits or {}  # key -> {KeyLimits field: value}: its own limits

    @classmethod
    def load(cls, path: str) -> "Acl":
        """The ACL of a TOML file; a missing file grants nothing."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return cls({})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidArgument(f"cannot read the ACL {path}: {e}") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: dict, where: str = "acl") -> "Acl":
        unknown = set(data) - {"grants", "limits"}
        if unknown:
            raise InvalidArgument(f"{where}: unknown table(s) {sorted(unknown)}; the ACL holds [grants.NAME] "
                                  "and [limits.NAME]")
        grants = {}
        for name, table in data.get("grants", {}).items():
            check_name(name)
            if not isinstance(table, dict):
                raise InvalidArgument(f"{where}: [grants.{name}] must map space patterns to lists of rights")
            grants[name] = tuple(_grant(pattern, rights, f"{where}: grants.{name}")
                                 for pattern, rights in table.items())
        limits = {}
        for name, table in data.get("limits", {}).items():
            check_name(name)
            limits[name] = _limits(table, f"{where}: limits.{name}")
        return cls(grants, limits)

    def rights(self, principal: str, space: str) -> frozenset[str]:
        held = frozenset().union(*(g.rights for g in self.grants.get(principal, ()) if g.matches(space)))
        return held | {"observe", "recall"} if "admin" in held else held

    def check(self, principal: str, space: str, right: str) -> None:
        """Raise Forbidden unless `principal` holds `right` on `space`."""
        if right not in self.rights(principal, space):
            raise Forbidden(f"key {principal!r} holds no {right!r} right on space {space!r}",
                            space=space, right=right)

    def check_engine(self, principal: str) -> None:
        """Raise Forbidden unless `principal` holds admin on every space."""
        if not self.is_engine_admin(principal):
            raise Forbidden(f"key {principal!r} needs admin on \"*\" for engine-wide operations",
                            right="admin")

    def is_engine_admin(self, principal: str) -> bool:
        return any(g.pattern == ENGINE and "admin" in g.rights for g in self.grants.get(principal, ()))

    def holds_any(self, principal: str) -> bool:
        return any(g.rights for g in self.grants.get(principal, ()))


def _grant(pattern, rights, where: str) -> Grant:
    if not pattern or "*" in pattern[:-1]:
        raise InvalidArgument(f"{where}: pattern {pattern!r} is a space name or a prefix ending in '*'")
    if not isinstance(rights, list) or not set(rights) <= set(RIGHTS):
        raise InvalidArgument(f"{where}.{pattern!r}: rights are a list of {RIGHTS}, got {rights!r}")
    return Grant(pattern, frozenset(rights))


def _limits(table, where: str) -> dict:
    fields = [f.name for f in dataclasses.fields(KeyLimits)]
    if not isinstance(table, dict) or not set(table) <= set(fields):
        raise InvalidArgument(f"{where}: a table of {fields}, got {table!r}")
    for field, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(f"{where}.{field}: a non-negative integer, got {value!r}")
    return dict(table)
