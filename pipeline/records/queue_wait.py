"""Wait for DVC's experiment queue to drain: ``python -m pipeline.records.queue_wait`` (used by `make sweep-*`).

Prints the queue's status when it changes; exits 1 if any experiment failed (its logs:
``dvc queue logs <name>``).
"""
from __future__ import annotations

import subprocess
import sys
import time


def status() -> str:
    return subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True, check=True).stdout


def main(poll: float = 10.0) -> int:
    last = None
    while True:
        text = status()
        if text != last:
            print(text.rstrip(), flush=True)
            last = text
        rows = [line.split() for line in text.splitlines()[1:] if line.strip()]
        states = [r for row in rows for r in row if r in ("Queued", "Running", "Failed", "Success")]
        if "Queued" not in states and "Running" not in states:
            failed = states.count("Failed")
            if failed:
                print(f"{failed} experiment(s) failed: see `dvc queue logs <name>`", file=sys.stderr)
            return 1 if failed else 0
        time.sleep(poll)


if __name__ == "__main__":
    raise SystemExit(main())
