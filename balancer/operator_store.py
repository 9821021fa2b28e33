"""Operator settings that survive restarts and failovers: each region's drains and capacity limits, in a store.

An operator's ``drain`` or ``set_capacity`` (balancer/control) lives in the core's memory; without a store a
restarted balancer, or a standby that took over, would forget it and send new sessions to a substation being
serviced. So every accepted control command writes the region's settings (all of them, one small JSON document),
and a region's balancer reads them back before it acts on any input (before its startup gate opens).

Two backends, one per deployment mode:

* :class:`FileStore` (single-node Mosquitto mode): one JSON file for every region of the process
  (``BALANCER_STATE_FILE``), replaced atomically (written beside it, fsynced, renamed): a ``kill -9`` leaves the
  old file or the new one, never half of one. The write is synchronous: it is done before the command's result
  is published.
* :class:`KvStore` (cluster mode): NATS JetStream key-value, bucket ``grid_operator``, key ``region.<R>``; written
  with compare-and-swap on the revision last read or written, so an old owner that lost its region cannot
  overwrite what its successor wrote. Writes are done in order by one task; the command's result is published
  once the write has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from balancer.core import OperatorSettings
from grid_runtime.logs import get_logger

__all__ = ["OPERATOR_BUCKET", "FileStore", "KvStore", "OperatorStore", "decode_settings", "encode_settings"]

log = get_logger("balancer.operator_store")

#: The NATS KV bucket of the operator settings (one key per region: ``region.<R>``).
OPERATOR_BUCKET = "grid_operator"


class _Stored(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One substation's settings as stored (watts: exactly what the core plans with)."""

    draining: bool = False
    capacity_limit_w: int | None = None


def encode_settings(settings: dict[str, OperatorSettings]) -> bytes:
    return msgspec.json.encode({sid: _Stored(draining=s.draining, capacity_limit_w=s.capacity_limit_w)
                                for sid, s in sorted(settings.items())})


def decode_settings(payload: bytes) -> dict[str, OperatorSettings]:
    """Raises ``msgspec.DecodeError`` / ``ValidationError`` on a damaged document (the caller refuses to start)."""
    if not payload:
        return {}
    stored = msgspec.json.decode(payload, type=dict[str, _Stored])
    return {sid: OperatorSettings(draining=s.draining, capacity_limit_w=s.capacity_limit_w)
            for sid, s in stored.items()}


Done = Callable[[bool], None]


class OperatorStore:
    """One region's settings: :meth:`load` once at start, :meth:`save` on every accepted control command."""

    region: str

    async def load(self) -> dict[str, OperatorSettings]:
        raise NotImplementedError

    def save(self, settings: dict[str, OperatorSettings], done: Done | None = None) -> None:
        """Store ``settings`` (the region's whole set); ``done(ok)`` is called once it is stored (or failed)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Finish the writes under way (bounded)."""


class FileStore(OperatorStore):
    """Every region of the process in one JSON file ``{region: {substation: settings}}``, replaced atomically."""

    def __init__(self, path: str | Path, region: str) -> None:
        self.path = Path(path)
        self.region = region

    def _read_all(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        document = msgspec.json.decode(raw) if raw.strip() else {}
        if not isinstance(document, dict):
            raise ValueError(f"{self.path}: expected a JSON object of regions")
        return document

    async def load(self) -> dict[str, OperatorSettings]:
        region = self._read_all().get(self.region, {})
        return decode_settings(msgspec.json.encode(region))

    def save(self, settings: dict[str, OperatorSettings], done: Done | None = None) -> None:
        ok = True
        try:
            document = self._read_all()
            document[self.region] = msgspec.json.decode(encode_settings(settings))
            self._replace(msgspec.json.format(msgspec.json.encode(document)))
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            ok = False
            log.error("operator_settings_not_saved", path=str(self.path), region=self.region, error=str(exc))
        if done is not None:
            done(ok)

    def _replace(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a power cut once the directory is synced
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class KvStore(OperatorStore):
    """The region's settings under ``region.<R>`` in a NATS KV bucket, written by compare-and-swap."""

    def __init__(self, kv: Any, region: str) -> None:
        self.kv = kv
        self.region = region
        self.key = f"region.{region}"
        #: the revision last read or written (0: the key did not exist)
        self.revision = 0
        self._queue: asyncio.Queue[tuple[bytes, Done | None]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def load(self) -> dict[str, OperatorSettings]:
        import nats.js.errors

        try:
            entry = await self.kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            self.revision = 0
            return {}
        self.revision = entry.revision or 0
        return decode_settings(entry.value or b"")

    def save(self, settings: dict[str, OperatorSettings], done: Done | None = None) -> None:
        self._queue.put_nowait((encode_settings(settings), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_all(), name=f"operator-{self.region}")

    async def _write_all(self) -> None:
        while not self._queue.empty():
            payload, done = self._queue.get_nowait()
            ok = await self._write(payload)
            if done is not None:
                done(ok)

    async def _write(self, payload: bytes) -> bool:
        import nats.errors
        import nats.js.errors

        try:
            if self.revision:
                self.revision = await self.kv.update(self.key, payload, last=self.revision)
            else:
                self.revision = await self.kv.create(self.key, payload)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            # Somebody else wrote the region's settings: it owns the region now (we lost the lease).
            log.error("operator_settings_conflict", region=self.region, revision=self.revision,
                      hint="another balancer owns this region now; this one steps down")
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.error("operator_settings_not_saved", region=self.region, error=repr(exc))
        return False

    async def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._writer)
