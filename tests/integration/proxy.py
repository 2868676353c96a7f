"""A TCP proxy in front of the local S3 server that a test can slow down, stall or take down: storage
faults on the real wire protocol, without touching the server or the client."""

from __future__ import annotations

import socket
import threading
import time


class StallingProxy:
    """Forwards TCP to ``upstream``. Once ``stall`` is set it holds every connection open without
    forwarding a byte (new ones too); while ``down`` is set it drops every connection (an outage:
    connection resets); clearing ``down`` restores service."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.stall, self.closed = upstream, threading.Event(), threading.Event()
        self.down = threading.Event()
        self.bytes_per_s: float | None = None
        """Set: every connection forwards at most this many bytes per second each way (a slow link)."""
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.down.is_set():
                client.close()
                continue
            if self.stall.is_set():
                continue  # accepted, never answered
            remote = socket.create_connection(self.upstream)
            self.sockets.append(remote)
            for src, dst in ((client, remote), (remote, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                if self.down.is_set():
                    src.close()
                    dst.close()
                    return
                if self.stall.is_set():
                    self.closed.wait()  # hold: nothing more goes through
                    return
                dst.sendall(data)
                if self.bytes_per_s:
                    time.sleep(len(data) / self.bytes_per_s)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            s.close()
