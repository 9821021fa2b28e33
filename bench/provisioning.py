"""``python -m bench provisioning``: what an account added or removed at runtime costs, by how many accounts the
broker holds.

Mosquitto's dynamic security plugin rewrites its whole state file after every change, so a runtime change should
cost time in proportion to the accounts it holds. For each size N this starts a private broker whose state file
already holds N EV accounts (written by ``broker.dynsec``, as the local run, the tests and compose do), then adds and
removes EV accounts one at a time through :class:`broker.provisioning.DynsecProvisioner` (the API's path) and
prints the wall time per change (p50 and max), the broker's CPU per change, and the state file's size. Writing the
start file itself is timed too.

    python -m bench provisioning [--sizes 200,1000,5000,20000] [--changes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from broker import dynsec
from broker.accounts import build_accounts
from broker.local import LocalBroker
from broker.provisioning import DynsecProvisioner
from grid_runtime.mqtt import make_transport
from grid_runtime.percentiles import percentile
from grid_runtime.settings import MqttSettings


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _changes(broker: LocalBroker, changes: int) -> tuple[list[float], list[float], float]:
    settings = MqttSettings(host=broker.host, port=broker.port, username="provisioner",
                            password=broker.password_for("provisioner"), session_expiry_s=0)
    transport = make_transport("paho", settings, client_id="provisioner", clean_start=True)
    provisioner = DynsecProvisioner(transport, broker.prefix, timeout_s=120)
    task = asyncio.create_task(transport.run())
    await asyncio.wait_for(transport.connected.wait(), 10)
    assert broker.pid is not None
    adds, removes = [], []
    cpu0 = _cpu_s(broker.pid)
    try:
        for i in range(changes):
            t0 = time.perf_counter()
            await provisioner.add_ev(f"BENCH_{i:05d}")
            adds.append(time.perf_counter() - t0)
        for i in range(changes):
            t0 = time.perf_counter()
            await provisioner.remove_ev(f"BENCH_{i:05d}")
            removes.append(time.perf_counter() - t0)
    finally:
        cpu = _cpu_s(broker.pid) - cpu0
        await transport.close()
        task.cancel()
    return adds, removes, cpu / (2 * changes)


def _p50(values: list[float]) -> float:
    p50 = percentile(values, 50)
    assert p50 is not None, "no changes measured"
    return p50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench provisioning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200,1000,5000,20000", help="accounts the broker holds")
    parser.add_argument("--changes", type=int, default=10, help="accounts added (then removed) per size")
    args = parser.parse_args(argv)
    print(f"{'accounts':>9} {'write file':>11} {'file KB':>8} {'add p50/max ms':>16} {'remove p50/max ms':>18} "
          f"{'broker CPU ms/change':>21}")
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="gridlb-bench-") as tmp:
            evs = [f"EV_{i:06d}" for i in range(n)]
            t0 = time.perf_counter()
            config = dynsec.render_config("grid/v1", build_accounts("s", [], evs, {"provisioner": "p"}))
            dynsec.write_config(Path(tmp) / "probe.json", config)
            written = time.perf_counter() - t0
            with LocalBroker(Path(tmp) / "broker", ev_ids=evs, substation_ids=[], secret="s",
                             services=("provisioner",), start_timeout=60) as broker:
                adds, removes, cpu = asyncio.run(_changes(broker, args.changes))
                size_kb = broker.dynsec_file.stat().st_size / 1024
        print(f"{n:>9} {written * 1000:>9.0f}ms {size_kb:>8.0f} "
              f"{_p50(adds) * 1000:>8.1f}/{max(adds) * 1000:<7.1f} "
              f"{_p50(removes) * 1000:>9.1f}/{max(removes) * 1000:<8.1f} {cpu * 1000:>21.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
