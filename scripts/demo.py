#!/usr/bin/env python3
"""`make demo`: the 2020-06-11 sessionstore incident and a 3x surge, replayed side by side.

Envoy with no protection, stock Envoy (default circuit breakers), Envoy's tuned circuit
breaker, adaptive_concurrency and admission_control, and sessionguard, each in front of the
same memory-limited store emulator (kask-sim under a CrashLoopBackOff supervisor) under the
same open-loop load: the incident (0.75x capacity, surge x1.33) and a 3x surge whose reader
keys no cache can absorb. Prints progress and a results table per scenario; records the run
in docs/results/replay.json and regenerates docs/replay.md, docs/img/replay-*.png and the
README's replay table from it.

Arguments are passed to scripts/replay.py instead of the default `--scenario incident,surge3`
(e.g. `--quick`, `--setups bare,sessionguard`, `--scenario surge5`).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    if not args:
        # The exact command recorded in docs/results/replay.json.
        os.environ.setdefault("SG_REPLAY_COMMAND", "make demo")
        args = ["--scenario", ",".join(replay.DEMO)]
    print(__doc__.split("\n\n")[1].replace("\n", " ").strip(), end="\n\n")
    return replay.main(args)


if __name__ == "__main__":
    sys.exit(main())
