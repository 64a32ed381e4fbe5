"""A private, throw-away Postgres cluster (initdb/pg_ctl in a tmp dir on a free port) that a
test or benchmark can take down and bring back: tests/auditor/test_faults.py, tests/chaos,
bench/chaos.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from fedllm.embedded import free_port, wait_port

PG_BIN = Path(os.environ.get("FEDLLM_PG_BIN", "/usr/lib/postgresql/15/bin"))


class Cluster:
    """A private Postgres cluster; run as the `postgres` OS user when we are root."""

    def __init__(self, root: Path) -> None:
        self.dir, self.port = root / "pgdata", free_port()
        self.log = root / "pg.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(root, "postgres")

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.as_user, *args], capture_output=True, timeout=60, text=True)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {done.stderr or done.stdout}")

    def init(self) -> Cluster:
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.dir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        return self.start()

    def start(self) -> Cluster:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.dir),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "start",
        )
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-m", mode, "-w", "stop")
