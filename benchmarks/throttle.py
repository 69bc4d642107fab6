"""A TCP proxy that holds every client of a server to one bandwidth, as an object store does.

    python benchmarks/throttle.py TARGET_PORT MB_PER_S     # prints the port it listens on

On loopback a store answers as fast as two cores copy bytes, so a compressed
write has nothing to gain there; behind a real bucket the network is what costs.
The proxy stands for that network: one token bucket per direction (uploads and
downloads, as a full-duplex link), shared by every connection, so that 32
parallel requests share the rate as they would share a host's link, and no
request is slowed below what the others leave it. A bucket holds at most 10 ms
of its rate, the burst a link's buffers absorb.

It runs in a process of its own (bench.py starts it): its threads then never
wait on the benchmark's GIL, nor the benchmark on theirs.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time

CHUNK = 256 << 10  # bytes moved per recv; at 1 GB/s, 4000 Python iterations a second
_closing = threading.Lock()


class TokenBucket:
    """rate bytes a second, at most burst bytes at once; take() sleeps off any debt.

    A taker may drive the bucket below zero (a chunk larger than what is left) and
    then sleeps until the debt is paid: concurrent takers queue behind each other's
    debt, so the total never runs above the rate, whatever the chunk sizes.
    """

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class ThrottlingProxy:
    """Listens on a free loopback port and forwards each connection to target_port,
    every byte through the direction's bucket."""

    def __init__(self, target_port: int, bytes_per_s: float):
        burst = max(CHUNK, bytes_per_s / 100)
        self.up = TokenBucket(bytes_per_s, burst)  # client to server: a save's PUTs
        self.down = TokenBucket(bytes_per_s, burst)  # server to client: a restore's GETs
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._listener.getsockname()[1]

    def serve_forever(self) -> None:
        while True:
            client, _ = self._listener.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                # Small requests (headers, the index, a 1024-leaf case's GETs) must not wait
                # on Nagle's algorithm: only the buckets decide when bytes move.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pumps = [2]  # the second pump to end closes both sockets
            for a, b, bucket in ((client, upstream, self.up), (upstream, client, self.down)):
                threading.Thread(target=self._pump, args=(a, b, bucket, pumps), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket, bucket: TokenBucket, pumps: list[int]) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with contextlib.suppress(OSError):
            while n := a.recv_into(buf):
                bucket.take(n)
                b.sendall(view[:n])
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)
        with _closing:
            pumps[0] -= 1
            last = pumps[0] == 0
        if last:
            a.close()
            b.close()


def main(argv: list[str]) -> int:
    target, mb_per_s = int(argv[0]), float(argv[1])
    proxy = ThrottlingProxy(target, mb_per_s * 1e6)
    print(proxy.port, flush=True)
    proxy.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
