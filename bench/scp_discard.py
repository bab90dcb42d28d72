"""Our C-STORE SCP with a handler that discards every data set (benchmark target).

Prints ``READY <port>`` on stdout once it listens, so the benchmark starts
senders on a signal, not after a sleep. Stops on SIGTERM/SIGINT.

``--processes N`` forks N-1 more processes that accept on the same listening
socket (the kernel spreads connections), as the router's workers will: one
Python process runs one core, so parallel streams need parallel processes.
"""

from __future__ import annotations

import argparse
import logging
import os
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
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = Server(Handlers(on_c_store_stream=_sink), port=args.port)
    children: list[int] = []
    is_parent = True
    for _ in range(args.processes - 1):
        pid = os.fork()  # before any thread exists: the child is a clean copy
        if pid == 0:
            children, is_parent = [], False
            break
        children.append(pid)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if is_parent:
        print(f"READY {server.port}", flush=True)
    stop.wait()
    server.shutdown()
    for pid in children:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
