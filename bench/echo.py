"""Raw request/echo responder: the same broker, account, topics and transport as the balancer,
with no balancing. Its rate is the ceiling the balancer is compared with."""

from __future__ import annotations

import asyncio
import gc

from grid_protocol import TopicKind, Topics
from grid_runtime.lifecycle import run_until_signalled
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
        await stop.wait()
        await transport.close()
        task.cancel()

    gc.collect()
    gc.freeze()  # as the balancer does at start (balancer/cli.py)
    run_until_signalled(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
