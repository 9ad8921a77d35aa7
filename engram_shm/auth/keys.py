"""A keys directory: the server's CURVE key pair and the client keys it accepts.

    KEYS/server.key               the server's public key: give it to clients
    KEYS/server.key_secret        the server's key pair (0600)
    KEYS/clients/NAME.key         the public key of an accepted client
    KEYS/issued/NAME.key_secret   a client key pair made by `keys new` (0600):
                                  hand it to the client, then delete it here
    KEYS/revoked/NAME.key         public keys of revoked clients, for the record
    KEYS/acl.toml                 what each key may do (acl.py)

Files are pyzmq's certificate format (zmq.auth.create_certificates), so any
ZeroMQ tool reads them. The directory and the secrets are private to the
owner (0700, 0600): whoever reads a secret key is that client.
"""

from __future__ import annotations

import os
import re
import time

import zmq
import zmq.auth

from ..errors import InvalidArgument, Unauthenticated

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = ("anonymous", "server")
SERVER = "server"


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED:
        raise InvalidArgument(f"a key name matches {NAME_PATTERN.pattern} and is not one of "
                              f"{RESERVED}, got {name!r}")


class KeysDir:
    def __init__(self, path: str):
        if not path:
            raise InvalidArgument("no keys directory: give --keys-dir, or a data directory (--data)")
        self.path = os.path.abspath(path)
        self.clients = os.path.join(self.path, "clients")
        self.issued = os.path.join(self.path, "issued")
        self.revoked = os.path.join(self.path, "revoked")
        self.acl = os.path.join(self.path, "acl.toml")

    def _private_dirs(self) -> None:
        for d in (self.path, self.clients, self.issued, self.revoked):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        os.chmod(self.issued, 0o700)

    # -- the server's key -------------------------------------------------------------
    def server_key(self, create: bool = False) -> tuple[bytes, bytes]:
        """The server's (public, secret) key, made on first use when `create`."""
        secret_file = os.path.join(self.path, SERVER + ".key_secret")
        if not os.path.exists(secret_file):
            if not create:
                raise Unauthenticated(f"no server key in {self.path}: start the server with --auth curve "
                                      "once, or run `engram-shm keys new`")
            self._private_dirs()
            _, secret_file = zmq.auth.create_certificates(self.path, SERVER)
            os.chmod(secret_file, 0o600)
        return _load(secret_file, secret=True)

    @property
    def server_public_file(self) -> str:
        return os.path.join(self.path, SERVER + ".key")

    # -- client keys ------------------------------------------------------------------
    def new(self, name: str) -> str:
        """Make a key pair for client `name` and accept it; returns the path of
        the pair to hand to the client."""
        self._check_free(name)
        self.server_key(create=True)
        public_file, secret_file = zmq.auth.create_certificates(self.issued, name)
        os.chmod(secret_file, 0o600)
        os.replace(public_file, os.path.join(self.clients, name + ".key"))
        return secret_file

    def add(self, name: str, public_file: str) -> str:
        """Accept a client key made elsewhere (its secret never leaves the client)."""
        self._check_free(name)
        public, _ = _load(public_file, secret=False)
        if public in self.accepted():
            raise InvalidArgument(f"that key is already accepted as {self.accepted()[public]!r}")
        self.server_key(create=True)
        target = os.path.join(self.clients, name + ".key")
        with open(public_file, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        return target

    def revoke(self, name: str) -> None:
        """Stop accepting `name`'s key; its issued pair is deleted."""
        check_name(name)
        public_file = os.path.join(self.clients, name + ".key")
        if not os.path.exists(public_file):
            raise InvalidArgument(f"no accepted key named {name!r} in {self.clients}")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        os.replace(public_file, os.path.join(self.revoked, f"{name}.{stamp}.key"))
        issued = os.path.join(self.issued, name + ".key_secret")
        if os.path.exists(issued):
            os.remove(issued)

    def _check_free(self, name: str) -> None:
        check_name(name)
        self._private_dirs()
        if os.path.exists(os.path.join(self.clients, name + ".key")):
            raise InvalidArgument(f"a key named {name!r} exists; revoke it first to replace it")

    def accepted(self) -> dict[bytes, str]:
        """z85 public key -> name, of every accepted client key."""
        if not os.path.isdir(self.clients):
            return {}
        keys = {}
        for entry in sorted(os.listdir(self.clients)):
            if entry.endswith(".key"):
                keys[_load(os.path.join(self.clients, entry), secret=False)[0]] = entry[:-4]
        return keys

    def listing(self) -> list[dict]:
        """Every client key, accepted or revoked, for `keys list`."""
        rows = [{"name": name, "state": "accepted", "public_key": public.decode()}
                for public, name in self.accepted().items()]
        if os.path.isdir(self.revoked):
            for entry in sorted(os.listdir(self.revoked)):
                name, _, stamp = entry[:-4].rpartition(".")
                public, _ = _load(os.path.join(self.revoked, entry), secret=False)
                rows.append({"name": name, "state": f"revoked {stamp}", "public_key": public.decode()})
        return rows


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) of a certificate file, with a clear error."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read a CURVE key from {path}: {e}") from None
    if secret and not secret_key:
        raise InvalidArgument(f"{path} holds no secret key (a .key_secret file is needed)")
    return public, secret_key


def load_pair(path: str) -> tuple[bytes, bytes]:
    """A client's (public, secret) key from its .key_secret file."""
    return _load(path, secret=True)


def load_public(path: str) -> bytes:
    return _load(path, secret=False)[0]
