#!/usr/bin/env python3
"""`make demo`: the 2020-06-11 sessionstore incident, replayed side by side.

Envoy with no protection, Envoy's circuit breaker, adaptive_concurrency and admission_control,
and sessionguard, each in front of the same memory-limited store emulator (kask-sim under a
CrashLoopBackOff supervisor) under the same open-loop surge. Prints progress and a results
table; writes docs/replay.md and docs/img/replay.png. About 8 minutes on 2 cores.

Arguments are passed to scripts/replay.py (e.g. `--quick`, `--setups bare,sessionguard`).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    if not args:
        # The exact command recorded in docs/replay.md.
        os.environ["SG_DEMO"] = "1"
    print(__doc__.split("\n\n")[1].replace("\n", " ").strip(), end="\n\n")
    return replay.main(args)


if __name__ == "__main__":
    sys.exit(main())
