"""An "orchestrator host" for the lock tests: takes an appliance's lock through the store
and reports when it holds it, in a process and working directory of its own.

    python -m tests.store.lockholder DATABASE LOCK_DIR APPLIANCE HOLD_S [TIMES]

Prints ``acquired T`` and ``released T`` (``time.monotonic()``, one clock for every
process on the host) for each of TIMES holds, each held HOLD_S seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hsmctl.state import Store


def main(argv: list[str]) -> None:
    database, lock_dir, appliance, hold = argv[:4]
    times = int(argv[4]) if len(argv) > 4 else 1
    with Store.open(database) as store:
        for _ in range(times):
            with store.appliance_lock(appliance, lock_dir=Path(lock_dir)):
                print(f"acquired {time.monotonic():.6f}", flush=True)
                time.sleep(float(hold))
                print(f"released {time.monotonic():.6f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
