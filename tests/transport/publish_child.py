"""Child process for the SIGKILL test: drains an outbox to the broker over a
slow link (each chunk takes ``delay`` seconds), logging every confirmed chunk
to stderr, until it is killed.

usage: publish_child.py OUTBOX_DIR EXCHANGE CHUNK_SIZE DELAY_S
"""

import logging
import sys
import time

import pika.adapters.blocking_connection as bc

from waggle_trainer.transport import AmqpSettings, Outbox, UpdatePublisher


def main() -> None:
    outbox_dir, exchange, chunk_size, delay = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG, format="%(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    publish = bc.BlockingChannel.basic_publish

    def slow_publish(self, *a, **kw):  # a slow uplink, so the kill lands mid-update
        time.sleep(delay)
        return publish(self, *a, **kw)

    bc.BlockingChannel.basic_publish = slow_publish
    pub = UpdatePublisher(
        AmqpSettings(connection_name="test-child"),
        Outbox(outbox_dir, 1 << 30),
        node_id="child",
        exchange=exchange,
        chunk_size=chunk_size,
    )
    pub.start()
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
