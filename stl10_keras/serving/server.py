"""The lifecycle both front ends share: bind, start, wait, stop."""

from __future__ import annotations

import abc
import threading

#: The longest `stop()` waits for a serving thread after its grace period: a
#: thread that hangs is reported by `wait(0)`, not waited for forever.
JOIN_SECONDS = 10.0


class Server(abc.ABC):
    """A front end of a `ModelRepository` (REST or gRPC), started and stopped alike.

    A subclass binds its address in `__init__`, so a port in use is an `OSError`
    there and `port` is the bound port (0 asks for any free one), then calls
    `Server.__init__`. `start()` serves in background threads; `wait()` blocks
    until the server has stopped; `stop()` stops it from any thread. As a
    context manager it starts on entry and stops on exit:

        with ModelServer(repository, port=0) as server:
            print(server.url)
            server.wait()  # until stop() from another thread, or Ctrl-C

    Args:
        host: the bound address.
        port: the bound TCP port.
    """

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self._stopping = False
        self._ended = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        """`host:port` (an IPv6 host in brackets), as clients take it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @abc.abstractmethod
    def start(self) -> None:
        """Serve in background threads; returns at once."""

    @abc.abstractmethod
    def _shutdown(self, grace: float | None) -> None:
        """Stop serving; set `_ended` once the serving threads have ended.

        (A serving loop that ends by itself sets `_error` and `_ended`.)
        """

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (started or not); requests in flight get `grace` seconds.

        Returns once the server's threads have ended (or a few seconds after
        `grace`, if one hangs: then `wait(0)` is False); a second call does
        nothing.
        """
        if not self._stopping:
            self._stopping = True
            self._shutdown(grace)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped, or for `timeout` seconds.

        In the main thread, Ctrl-C raises `KeyboardInterrupt` here.

        Returns:
            Whether the server has stopped.

        Raises:
            Exception: what ended the serving loop, when not `stop()`.
        """
        ended = self._ended.wait(timeout)
        if self._error is not None:
            raise self._error
        return ended

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
