"""`mlxd serve` whose embeddings service runs a fake runner that blocks on the input "hang",
for the stall test: `python -m tests.engine.stall_serve [serve flags]` runs the real supervisor;
its service processes are `python -m tests.engine.stall_serve worker SERVICE FD`, the real
worker with that runner."""

from __future__ import annotations

import os
import socket
import sys
import threading

import numpy as np

from engine.app import create_app
from engine.cli import build_parser, config_from_args
from engine.config import CONFIG_ENV, Config
from engine.supervisor import Supervisor
from engine.worker import exit_now, setup_logging
from tests.engine.fakes import FakeEmbeddings, fake_spec

HANG = "hang"


class HangingEmbeddings(FakeEmbeddings):
    """Blocks the model thread (as a wedged MLX call would) on an input that holds "hang"."""

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        plain = super().tokenize(texts)
        return [[0] if HANG in text else plain[i] for i, text in enumerate(texts)]

    def embed(self, token_lists: list[list[int]]) -> np.ndarray:
        if [0] in token_lists:
            threading.Event().wait()
        return super().embed(token_lists)


class StallSupervisor(Supervisor):
    def worker_command(self, service: str, fd: int) -> list[str]:
        return [sys.executable, "-m", "tests.engine.stall_serve", "worker", service, str(fd)]


def worker(service: str, fd: int) -> int:
    config = Config.from_json(os.environ[CONFIG_ENV])
    setup_logging(config.log_level, service)
    spec, _ = fake_spec(service, HangingEmbeddings())
    app = create_app(spec, config)
    sock = socket.socket(fileno=fd)
    app.run(sock=sock, single_process=True, access_log=False, motd=False, verbosity=0)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker(argv[1], int(argv[2]))
    config = config_from_args(build_parser().parse_args(["serve", *argv]))
    setup_logging(config.log_level, "mlxd")
    supervisor = StallSupervisor(config)
    supervisor.bind_all()
    return supervisor.run()


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
