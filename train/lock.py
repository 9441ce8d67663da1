"""One writer per run folder: `python -m train` (or a study) holds an exclusive lock on <run>/.lock while it may
write there. The lock is an flock, which the kernel drops when its process dies, so a folder left by a killed run
is never blocked; the holder's PID is written into the file for the error message of whoever comes second."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from train.config import ConfigError


class RunLock:
    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ConfigError(f"{out} is in use by another run (process {holder}); wait for it to end or stop it "
                              f"first") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()

    def __del__(self):
        self.release()
