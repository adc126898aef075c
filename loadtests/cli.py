"""`gatewatch loadtest …`: the benchmarks as a Typer sub-application (mounted by the main CLI)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from loadtests.bench import BenchOptions, run_benchmark

app = typer.Typer(help="Load tests and benchmarks of the serving path (loopback only).", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Load tests and benchmarks of the serving path (loopback only)."""


@app.command()
def serving(
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds per measured run.")] = 5.0,
    runs: Annotated[int, typer.Option(min=1, help="Runs per server and concurrency (median reported).")] = 3,
    warmup: Annotated[float, typer.Option(min=0.1, help="Seconds of load before each run.")] = 1.0,
    out: Annotated[Path, typer.Option(help="Markdown report; raw numbers go beside it as .json.")] = Path(
        "bench/REPORT-serving.md"
    ),
    pin: Annotated[bool, typer.Option(help="Pin servers and generator to different CPUs.")] = True,
    profile: Annotated[float, typer.Option(help="Then py-spy gatewatch for this many seconds (0 = off).")] = 0.0,
) -> None:
    """gatewatch vs naive FastAPI vs bare uvicorn vs onnxruntime in-process, at concurrency 1 and 64."""
    options = BenchOptions(
        duration=duration, runs=runs, warmup=warmup, out=out, pin=pin, profile_seconds=profile,
        command=_command_line(),
    )
    typer.echo(run_benchmark(options).report)


def _command_line() -> str:
    """The command as typed, for the report; the mount point is fixed by the main CLI."""
    given = sys.argv[sys.argv.index("serving") + 1 :] if "serving" in sys.argv else []
    return " ".join(["gatewatch loadtest serving", shlex.join(given)]).strip()


if __name__ == "__main__":
    app()
