"""Our C-STORE SCP with a handler that discards every data set (benchmark target).

Prints ``READY <port>`` on stdout once it listens, so the benchmark starts
senders on a signal, not after a sleep. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router.net.server import Handlers, Request, Server, StoreSink


class _Discard:
    def write(self, data: memoryview) -> None:
        pass

    def close(self) -> int:
        return 0

    def abort(self) -> None:
        pass


def _sink(_request: Request) -> StoreSink:
    return _Discard()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = Server(Handlers(on_c_store_stream=_sink), port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"READY {server.port}", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
