"""Who is calling: bearer tokens mapped to principals (a role, and for EV tokens the EV ids they may act for).

Roles:

* ``operator``: every route (``API_TOKEN``, or an ``operator`` entry in the token file);
* ``ev``: an EV, or a charge-point backend acting for several EVs: ``POST /charge``, ending sessions and
  withdrawing requests only for the EV ids it lists (``ev_ids``) or matches (``ev_pattern``, a full match), and,
  when reads are closed, reading only those EVs;
* ``viewer``: reads only (a control-room wall, a dashboard); matters when ``API_PUBLIC_READS`` is false.

The token file (``API_TOKENS_FILE``, JSON) holds only SHA-256 hashes of the tokens::

    {"tokens": [
      {"name": "EV_1234", "role": "ev", "ev_ids": ["EV_1234"], "sha256": "<64 hex>"},
      {"name": "cp-north", "role": "ev", "ev_pattern": "NORTH_[0-9]{4}", "sha256": "<64 hex>"},
      {"name": "wall", "role": "viewer", "sha256": "<64 hex>"}]}

Tokens are 256-bit random strings (:func:`new_token`), so a plain SHA-256 is enough: there is no dictionary of
likely tokens to try, and a stolen file gives nothing to log in with (passwords, which people choose, would
need a slow salted hash). ``python -m api.tokens add`` makes a token, prints it once and stores its hash.

The file is read again when it changes (checked at most once a second); a file that does not load is logged
(``api_tokens_file_invalid``) and the tokens loaded before stay in force.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from broker.accounts import SERVICE_ACCOUNTS
from grid_protocol.ids import checked_id
from grid_runtime.logs import get_logger

log = get_logger("api.tokens")

Role = Literal["operator", "ev", "viewer"]
ROLES: tuple[Role, ...] = ("operator", "ev", "viewer")
#: Longer bearer values are refused without hashing them.
MAX_TOKEN_LENGTH = 512
#: The file is looked at (stat) at most this often.
RELOAD_CHECK_S = 1.0


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the token file stores: the token's SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    role: Role
    ev_ids: frozenset[str] = frozenset()
    ev_pattern: re.Pattern[str] | None = None

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"

    @property
    def reads_grid(self) -> bool:
        """May read grid-wide views (every EV's sessions, the queue, the live feed)."""
        return self.role in ("operator", "viewer")

    def may_act_for(self, ev_id: str) -> bool:
        """May ask for power, end sessions and withdraw requests for ``ev_id``."""
        if self.role == "operator":
            return True
        if self.role != "ev":
            return False
        return ev_id in self.ev_ids or (self.ev_pattern is not None and self.ev_pattern.fullmatch(ev_id) is not None)

    def scope(self) -> str:
        """For messages: what this principal may act for."""
        if self.role != "ev":
            return self.role
        parts = sorted(self.ev_ids)[:5] + (["…"] if len(self.ev_ids) > 5 else [])
        if self.ev_pattern is not None:
            parts.append(f"ids matching /{self.ev_pattern.pattern}/")
        return ", ".join(parts)


class TokenEntry(BaseModel):
    """One token of the file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ev_ids: list[str] = Field(default_factory=list, max_length=100_000)
    ev_pattern: str | None = Field(None, max_length=200)

    @field_validator("ev_ids")
    @classmethod
    def _ids(cls, ids: list[str]) -> list[str]:
        for ev_id in ids:
            checked_id(ev_id, "ev_id")
            if ev_id in SERVICE_ACCOUNTS:
                raise ValueError(f"{ev_id!r} is a service account name, not an EV id")
        return ids

    @field_validator("ev_pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"ev_pattern is not a regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _scope(self) -> TokenEntry:
        if self.role == "ev" and not self.ev_ids and self.ev_pattern is None:
            raise ValueError(f"token {self.name!r}: role ev needs ev_ids or ev_pattern")
        if self.role != "ev" and (self.ev_ids or self.ev_pattern is not None):
            raise ValueError(f"token {self.name!r}: only role ev takes ev_ids / ev_pattern")
        return self

    def principal(self) -> Principal:
        pattern = re.compile(self.ev_pattern) if self.ev_pattern is not None else None
        return Principal(self.name, self.role, frozenset(self.ev_ids), pattern)


class TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> TokenFile:
        names = [t.name for t in self.tokens]
        hashes = [t.sha256 for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique")
        if len(set(hashes)) != len(hashes):
            raise ValueError("the same token hash is listed twice")
        return self


class TokenFileError(Exception):
    """The token file cannot be used (unreadable, not JSON, invalid entries)."""


def read_token_file(path: Path) -> TokenFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenFileError(f"cannot read API_TOKENS_FILE {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return TokenFile.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise TokenFileError(f"API_TOKENS_FILE {str(path)!r}: {where}: {first.get('msg')}"
                             + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")) from None


def write_token_file(path: Path, tokens: TokenFile) -> None:
    """Atomically (temporary file, then rename), readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(json.dumps(tokens.model_dump(exclude_defaults=True), indent=2) + "\n")
    tmp.replace(path)


@dataclass
class TokenStore:
    """Authenticates bearer tokens: the operator's ``API_TOKEN`` and the entries of ``API_TOKENS_FILE``."""

    operator_token: SecretStr | None = None
    path: Path | None = None
    clock: Callable[[], float] = time.monotonic
    #: first 8 bytes of a token's SHA-256 -> (the whole digest, its principal)
    _by_prefix: dict[bytes, list[tuple[bytes, Principal]]] = field(default_factory=dict, init=False)
    _file_key: tuple[int, int, int] | None = field(default=None, init=False)
    _checked_at: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self._load(initial=True)

    def _entries(self) -> dict[bytes, list[tuple[bytes, Principal]]]:
        by_digest: dict[bytes, Principal] = {}
        if self.operator_token is not None and self.operator_token.get_secret_value():
            by_digest[bytes.fromhex(hash_token(self.operator_token.get_secret_value()))] = Principal(
                "API_TOKEN", "operator")
        if self.path is not None:
            for entry in read_token_file(self.path).tokens:
                digest = bytes.fromhex(entry.sha256)
                if digest in by_digest:
                    raise TokenFileError(f"API_TOKENS_FILE: token {entry.name!r} is the same as API_TOKEN")
                by_digest[digest] = entry.principal()
        by_prefix: dict[bytes, list[tuple[bytes, Principal]]] = {}
        for digest, principal in by_digest.items():
            by_prefix.setdefault(digest[:8], []).append((digest, principal))
        return by_prefix

    def _stat_key(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, *, initial: bool = False) -> None:
        key = self._stat_key()
        try:
            by_prefix = self._entries()
        except TokenFileError as exc:
            if initial:
                raise
            log.error("api_tokens_file_invalid", error=str(exc), kept=len(self))
            self._file_key = key  # do not retry until it changes again
            return
        self._by_prefix, self._file_key = by_prefix, key
        if not initial:
            log.info("api_tokens_reloaded", tokens=len(self))

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        now = self.clock()
        if now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        if self._stat_key() != self._file_key:
            self._load()

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or ``None`` for a token nobody holds.

        Only digests are kept. The lookup goes by the first 8 bytes of the SHA-256 of the caller's token (its
        timing tells about the caller's own digest, never how much of a real token a guess got right), then the
        whole digest is compared in constant time (:func:`hmac.compare_digest`)."""
        self._maybe_reload()
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, principal in self._by_prefix.get(digest[:8], ()):
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    @property
    def configured(self) -> bool:
        """Any token at all: without one every write is refused (503)."""
        self._maybe_reload()
        return bool(self._by_prefix)

    @property
    def has_operator(self) -> bool:
        self._maybe_reload()
        return any(p.is_operator for bucket in self._by_prefix.values() for _, p in bucket)

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._by_prefix.values())


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m api.tokens``: add, list and remove tokens in a token file (only hashes are stored)."""
    parser = argparse.ArgumentParser(prog="python -m api.tokens", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="make a token, store its hash, print the token once")
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--ev-id", action="append", default=[], dest="ev_ids", help="role ev: an EV id (repeat)")
    add.add_argument("--ev-pattern", help="role ev: regular expression the EV ids match (in full)")
    listing = sub.add_parser("list", help="names, roles and scopes (never tokens)")
    listing.add_argument("file", type=Path)
    remove = sub.add_parser("remove", help="remove a token by name")
    remove.add_argument("file", type=Path)
    remove.add_argument("--name", required=True)
    from_env = sub.add_parser("from-env", help="write the file anew with tokens chosen elsewhere (docker compose: "
                                               "from .env), each read from an environment variable")
    from_env.add_argument("file", type=Path)
    from_env.add_argument("--token", action="append", required=True, metavar="NAME:ROLE[:EV_ID]=VARIABLE",
                          help="e.g. hand-test-EV_1234:ev:EV_1234=API_EV_TOKEN (repeat)")
    args = parser.parse_args(argv)
    if args.command == "from-env":
        return _from_env(args.file, args.token)
    try:
        current = read_token_file(args.file) if args.file.exists() else TokenFile()
        if args.command == "list":
            for t in current.tokens:
                print(f"{t.name}\t{t.role}\t{t.principal().scope()}")
            return 0
        if args.command == "remove":
            kept = [t for t in current.tokens if t.name != args.name]
            if len(kept) == len(current.tokens):
                print(f"no token named {args.name!r} in {args.file}", file=sys.stderr)
                return 1
            write_token_file(args.file, TokenFile(tokens=kept))
            return 0
        token = new_token()
        entry = TokenEntry(name=args.name, role=args.role, sha256=hash_token(token), ev_ids=args.ev_ids,
                           ev_pattern=args.ev_pattern)
        write_token_file(args.file, TokenFile(tokens=[*current.tokens, entry]))
    except (TokenFileError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _from_env(path: Path, specs: list[str]) -> int:
    entries = []
    try:
        for spec in specs:
            scope, sep, variable = spec.partition("=")
            name, _, rest = scope.partition(":")
            role, _, ev_id = rest.partition(":")
            value = os.environ.get(variable, "") if sep else ""
            if not value:
                raise ValueError(f"{spec!r}: environment variable {variable or '?'} is empty or unset")
            entries.append(TokenEntry(name=name, role=role, sha256=hash_token(value),
                                      ev_ids=[ev_id] if ev_id else []))
        write_token_file(path, TokenFile(tokens=entries))
    except (TokenFileError, ValidationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(entries)} token hashes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
