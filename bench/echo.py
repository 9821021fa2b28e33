"""Raw request/echo responder: the same broker, account, topics and transport as the balancer,
with no balancing. Its rate is the ceiling the balancer is compared with."""

from __future__ import annotations

import asyncio
import time

from balancer.gc_policy import PROCESS_GC
from grid_protocol import TopicKind, Topics
from grid_runtime.lifecycle import run_until_signalled, wait_event
from grid_runtime.mqtt import InMessage, make_transport
from grid_runtime.settings import MqttSettings


def main() -> int:
    settings = MqttSettings()
    topics = Topics()
    transport = make_transport("paho", settings, client_id=settings.username)

    def handle(msg: InMessage) -> None:
        parsed = topics.parse(msg.topic)
        if parsed is not None and parsed[1] is not None:
            transport.publish(topics.assignment(parsed[1]), msg.payload, 1)

    transport.set_handler(handle)
    transport.subscribe(topics.filter(TopicKind.EV_REQUEST), 1)

    async def run(stop: asyncio.Event) -> None:
        task = asyncio.create_task(transport.run())
        # The balancer's garbage-collector policy, started and stepped as its periodic loop does (a raised young
        # threshold, a freeze every second): an echo on CPython's defaults would pay collections the balancer
        # does not, and the ratio would flatter the balancer.
        PROCESS_GC.start(time.monotonic())
        while not await wait_event(stop, 0.5):
            PROCESS_GC.step(time.monotonic())
        await transport.close()
        task.cancel()

    run_until_signalled(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
