"""The serving benchmark: a smaller suite (tabular model, JSON, c=1 and 64: gatewatch vs naive FastAPI vs bare
uvicorn vs the raw server vs onnxruntime in-process), kept as `python -m loadtests.bench` and
`gatewatch loadtest serving`. It writes bench/REPORT-serving.md by default.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtests.suite import SuiteOptions, run_suite
from loadtests.workloads import TABULAR

SERVING_VARIANTS = ("raw", "bare", "naive", "gatewatch")


def serving_options(duration: float = 5.0, runs: int = 3, warmup: float = 1.0,
                    out: Path = Path("bench/REPORT-serving.md"), pin: bool = True, profile_seconds: float = 0.0,
                    command: str = "python -m loadtests.bench") -> SuiteOptions:
    return SuiteOptions(
        duration=duration, runs=runs, warmup=warmup, concurrencies=(1, 64), key_concurrencies=(1, 64),
        models=(TABULAR,), bodies=("json",), variants=SERVING_VARIANTS, pin=pin, profile_seconds=profile_seconds,
        out=out, title="Serving benchmark: gatewatch vs naive FastAPI vs bare uvicorn vs onnxruntime in-process",
        command=command,
    )


def parse_args(argv: Sequence[str] | None = None) -> SuiteOptions:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run [5]")
    parser.add_argument("--runs", type=int, default=3, help="runs per server and concurrency [3]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each run [1]")
    parser.add_argument("--out", type=Path, default=Path("bench/REPORT-serving.md"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and generator to CPUs")
    parser.add_argument("--profile", type=float, default=0.0, metavar="S",
                        help="then py-spy the gateway for S seconds at the highest concurrency [off]")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.warmup <= 0:
        parser.error("--runs, --duration and --warmup must be positive")
    given = list(sys.argv[1:] if argv is None else argv)
    return serving_options(args.duration, args.runs, args.warmup, args.out, not args.no_pin, args.profile,
                           " ".join(["python -m loadtests.bench", shlex.join(given)]).strip())


def main(argv: Sequence[str] | None = None) -> None:
    print(run_suite(parse_args(argv)).report)


if __name__ == "__main__":
    main()
