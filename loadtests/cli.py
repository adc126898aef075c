"""`gatewatch loadtest …`: load runs and benchmarks as a Typer sub-application (mounted by the main CLI).

Heavy imports happen inside the commands, so mounting this costs the main CLI nothing.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from loadtests.drivers import Driver

app = typer.Typer(help="Load tests and benchmarks of the serving path (loopback only).", no_args_is_help=True)

DriverOption = Annotated[str, typer.Option(help="auto (wrk if installed, for closed loop) | wrk | builtin.")]


@app.callback()
def main() -> None:
    """Load tests and benchmarks of the serving path (loopback only)."""


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(2)


@app.command()
def run(
    url: Annotated[str, typer.Argument(help="http://127.0.0.1:PORT/path (127.0.0.1, ::1 or localhost only).")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="Request body, or @FILE (POST).")] = None,
    header: Annotated[list[str] | None, typer.Option("--header", "-H", help="'Name: value', repeatable.")] = None,
    method: Annotated[str | None, typer.Option(help="Default: POST with a body, else GET.")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Connections.")] = 8,
    rate: Annotated[float | None, typer.Option("--rate", "-r", min=0.001,
                                               help="Open loop at this many requests/s (else closed loop).")] = None,
    duration: Annotated[float, typer.Option("--duration", "-t", min=0.01, help="Seconds.")] = 10.0,
    max_requests: Annotated[int, typer.Option("--max-requests", "-n", min=1)] = 10_000_000,
    expect: Annotated[int, typer.Option(help="Status counted as success.")] = 200,
    driver: DriverOption = "auto",
    ceiling: Annotated[bool, typer.Option(help="Also measure the driver against a trivial raw server.")] = False,
) -> None:
    """Drive load at one loopback URL until the duration or request budget is spent; print percentiles."""
    from loadtests.runner import RunRequest, run_command

    try:
        request = RunRequest(url, data, header or [], method, concurrency, rate, duration, max_requests, expect,
                             _driver(driver), ceiling)
        run_command(request)
    except (ValueError, RuntimeError, OSError) as error:
        raise _fail(str(error)) from None


@app.command()
def suite(
    duration: Annotated[float, typer.Option(min=0.05, help="Seconds per measured run.")] = 5.0,
    warmup: Annotated[float, typer.Option(min=0.05, help="Seconds of load before each run.")] = 1.0,
    runs: Annotated[int, typer.Option(min=1, help="Runs per cell (median and min–max reported).")] = 3,
    concurrencies: Annotated[str, typer.Option(help="Sweep for the throughput plot.")] = "1,8,64,128",
    key_concurrencies: Annotated[str, typer.Option(help="Where every row is measured.")] = "1,64",
    models: Annotated[str, typer.Option(help="tabular,mlp")] = "tabular,mlp",
    bodies: Annotated[str, typer.Option(help="json,binary")] = "json,binary",
    variants: Annotated[str, typer.Option(help="Rows to run (default all), e.g. gatewatch,naive,bare.")] = "",
    driver: DriverOption = "auto",
    out: Annotated[Path, typer.Option(help="Markdown report; JSON and PNGs go beside it.")] = Path("bench/REPORT.md"),
    pin: Annotated[bool, typer.Option(help="Pin servers and generator to different CPUs.")] = True,
    quiet_gate: Annotated[bool, typer.Option(help="Hold each run until the machine is quiet (bounded).")] = True,
    profile: Annotated[float, typer.Option(help="Then py-spy gatewatch for this many seconds (0 = off).")] = 0.0,
    paired: Annotated[bool, typer.Option(help="Also run the key comparisons side by side on one core.")] = True,
) -> None:
    """gatewatch vs onnxruntime in-process vs naive FastAPI vs bare uvicorn; logging, shadow, batching."""
    from loadtests.suite import VARIANT_KEYS, SuiteOptions, run_suite

    try:
        options = SuiteOptions(
            duration=duration, warmup=warmup, runs=runs, concurrencies=_csv_ints(concurrencies),
            key_concurrencies=_csv_ints(key_concurrencies), models=_csv(models),
            bodies=tuple(b for b in _csv(bodies) if b in ("json", "binary")),  # type: ignore[misc]
            variants=_csv(variants) or VARIANT_KEYS, driver=_driver(driver), pin=pin, quiet_gate=quiet_gate,
            profile_seconds=profile, paired=paired, out=out, inprocess_seconds=min(1.0, duration),
            command=_command_line("suite"),
        )
        outcome = run_suite(options)
    except (ValueError, RuntimeError) as error:
        raise _fail(str(error)) from None
    typer.echo(outcome.report)


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
    """The smaller suite: tabular, JSON, c=1 and 64, gatewatch vs naive vs bare vs raw vs in-process."""
    from loadtests.bench import serving_options
    from loadtests.suite import run_suite

    try:
        outcome = run_suite(serving_options(duration, runs, warmup, out, pin, profile, _command_line("serving")))
    except (ValueError, RuntimeError) as error:
        raise _fail(str(error)) from None
    typer.echo(outcome.report)


def _driver(text: str) -> Driver:
    if text not in ("auto", "wrk", "builtin"):
        raise ValueError(f"--driver must be auto, wrk or builtin, not {text!r}")
    return text  # type: ignore[return-value]


def _command_line(command: str) -> str:
    """The command as typed, for the report; the mount point is fixed by the main CLI."""
    given = sys.argv[sys.argv.index(command) + 1 :] if command in sys.argv else []
    return " ".join([f"gatewatch loadtest {command}", shlex.join(given)]).strip()


if __name__ == "__main__":
    app()
