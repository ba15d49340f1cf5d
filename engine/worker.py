"""One service process: a single-process Sanic server on a socket the supervisor bound.

Started by the supervisor as `python -m engine.worker SERVICE FD`, with the configuration as
JSON in the MLXD_SERVICE_CONFIG environment variable (not argv, which `ps` shows).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from engine import services
from engine.app import create_app
from engine.config import CONFIG_ENV, Config
from engine.logfile import RotatingLog, open_log
from engine.store.catalog import SERVICES

SWITCH_INTERVAL_S = 0.0005


def setup_logging(
    level: str, service: str, log_file: str | None = None, max_mb: int = 10
) -> RotatingLog | None:
    """Log to stderr, or (the supervisor with --log-file) to a size-rotated file, returned."""
    fmt = f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"
    rotating = open_log(log_file, max_mb, fmt) if log_file else None
    handler = rotating or logging.StreamHandler(sys.stderr)
    handler.setFormatter(rotating.formatter if rotating else logging.Formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for noisy in ("sanic.root", "sanic.server", "sanic.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return rotating


def exit_with_parent(interval: float = 1.0) -> None:
    """Stop this service if the supervisor dies, so an orphan never holds the port."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mlxd-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in SERVICES:
        print("usage: python -m engine.worker {chat,embeddings,stt} FD", file=sys.stderr)
        return 2
    service, fd = args[0], int(args[1])
    config = Config.from_json(os.environ[CONFIG_ENV])
    setup_logging(config.log_level, service)
    sock = socket.socket(fileno=fd)
    # The event loop and the model thread share the GIL; Python's default 5 ms switch interval
    # makes the loop wait that long to stream a token while the model thread runs Python code.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    exit_with_parent()
    app = create_app(services.spec(service), config)
    app.run(sock=sock, single_process=True, access_log=False, motd=False, verbosity=0)
    return 0


def exit_now(code: int) -> None:
    """Exit without waiting on the model thread, which may still be inside a long MLX call
    when shutdown has answered its requests."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
