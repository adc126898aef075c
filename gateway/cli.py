"""The `gatewatch` command line. Environment variables are read here (and by pydantic-settings), nowhere below."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console

from gateway.api.http_protocol import GatewayHttpProtocol
from gateway.settings import Settings, load_settings

app = typer.Typer(help="gatewatch: model-serving gateway with live monitoring.", no_args_is_help=True)
console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="GATEWATCH_CONFIG", help="YAML settings file (keys of design.md)."),
]


def _settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        console.print(f"[red]invalid settings[/red] ({config or 'environment'}):")
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "settings"
            console.print(f"  {where}: {problem['msg']} (got {problem.get('input')!r})")
        raise typer.Exit(2) from exc


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _configure_logging(level: str) -> None:
    if level.lower() not in _LOG_LEVELS:
        raise typer.BadParameter(f"{level!r} is not one of {' | '.join(_LOG_LEVELS)}", param_hint="--log-level")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per registry poll request is noise; failures surface through our own log lines.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


@app.callback()
def main() -> None:
    """gatewatch: versioned ONNX models behind one Open Inference Protocol gateway."""


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    config: ConfigOption = None,
    registry: Annotated[str | None, typer.Option(help="Overrides the `registry` setting.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (overrides `workers`).")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Serve the registry's models over the Open Inference Protocol (KServe V2) REST API."""
    settings = _settings_or_exit(config, registry=registry, workers=workers)
    _configure_logging(log_level)
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": GatewayHttpProtocol,  # uvicorn's httptools protocol, one socket write per response
        "log_level": log_level,
        "timeout_graceful_shutdown": settings.shutdown_timeout_seconds,
        "access_log": False,
        "proxy_headers": False,  # client addresses are never used; skip rewriting them on every request
    }
    console.print(f"gatewatch serving {settings.registry} on http://{host}:{port} (workers: {settings.workers})")
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; finish with exit status 0 instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    if settings.workers == 1:
        from gateway.app import create_app

        uvicorn.run(create_app(settings), **common)
        return
    _serve_workers(settings, config, registry, common)


def _serve_workers(settings: Settings, config: Path | None, registry: str | None, common: dict[str, Any]) -> None:
    """Several processes on one port; metrics aggregated through prometheus-client's multiprocess mode."""
    metrics_dir = settings.data_dir.resolve() / f"prometheus-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    if config is not None:
        os.environ["GATEWATCH_CONFIG"] = str(config.resolve())
    if registry is not None:
        os.environ["GATEWATCH_REGISTRY"] = registry
    try:
        uvicorn.run(
            "gateway.app:create_app_from_environment", factory=True, workers=settings.workers, **common
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def monitor(
    metrics_port: Annotated[int, typer.Option(help="Port of /metrics (0: any free one).")] = 9400,
    metrics_host: Annotated[str, typer.Option(help="Interface for /metrics.")] = "127.0.0.1",
    config: ConfigOption = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Watch the prediction logs: windows, drift, latency, alerts. Run several to share the streams."""
    settings = _settings_or_exit(config)
    _configure_logging(log_level)
    from monitors.service import run_monitor  # lazily: `serve` never pays for scipy

    run_monitor(settings, metrics_host=metrics_host, metrics_port=metrics_port)


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of traffic before the demo stops by itself.")] = 90.0,
    rate: Annotated[float, typer.Option(help="Requests per second.")] = 100.0,
    port: Annotated[int, typer.Option(help="Gateway port (0: a free one).")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="Monitor /metrics port (0: a free one).")] = 9400,
    data_dir: Annotated[
        Path, typer.Option(help="Example models and run logs go under <data_dir>/demo; the embedded Redis is here.")
    ] = Path(".gatewatch"),
) -> None:
    """Everything on one machine: gateway + monitor on an embedded Redis, traffic that drifts, signed webhooks."""
    import asyncio

    from loadtests.demo.run import DemoOptions, run_demo

    options = DemoOptions(duration=duration, rate=rate, port=port, metrics_port=metrics_port, data_dir=data_dir)
    raise typer.Exit(asyncio.run(run_demo(options, Console(soft_wrap=True))))


def _mount_loadtest() -> None:
    from loadtests.cli import app as loadtest_app

    app.add_typer(loadtest_app, name="loadtest")


_mount_loadtest()

routes_app = typer.Typer(help="Read and change a running gateway's routes (admin API).", no_args_is_help=True)
app.add_typer(routes_app, name="routes")

UrlOption = Annotated[str, typer.Option("--url", help="The gateway's base URL.")]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar="GATEWATCH_ADMIN_TOKEN", help="Admin bearer token.", show_default=False)
]


def _admin_call(method: str, url: str, token: str | None, **kwargs: Any) -> Any:
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    try:
        response = httpx.request(method, url, headers=headers, timeout=10, **kwargs)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    if response.status_code >= 400:
        console.print(f"[red]{response.status_code}[/red] {response.text}")
        raise typer.Exit(1)
    return response.json()


@routes_app.command("get")
def routes_get(
    endpoint: Annotated[str | None, typer.Argument(help="One endpoint; all when omitted.")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Print the routes (YAML)."""
    import yaml

    path = f"/admin/endpoints/{endpoint}" if endpoint else "/admin/endpoints"
    typer.echo(yaml.safe_dump(_admin_call("GET", url.rstrip("/") + path, token), sort_keys=False))


@routes_app.command("set")
def routes_set(
    endpoint: Annotated[str, typer.Argument(help="The endpoint to create or replace.")],
    route_file: Annotated[
        Path | None,
        typer.Argument(help="Route as YAML or JSON; - reads standard input.", show_default=False),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Route as YAML or JSON; - reads standard input.")
    ] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    token: TokenOption = None,
) -> None:
    """Create or replace an endpoint's route from a YAML or JSON file."""
    import yaml

    file = file or route_file
    if file is None:
        raise typer.BadParameter("give the route file: gatewatch routes set ENDPOINT FILE (or --file FILE)")
    if str(file) != "-" and not file.is_file():
        raise typer.BadParameter(f"no such route file: {file}")
    content = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    looks_json = file.suffix == ".json" or (str(file) == "-" and content.lstrip()[:1] in (b"{", b"["))
    content_type = "application/json" if looks_json else "application/yaml"
    stored = _admin_call(
        "PUT", f"{url.rstrip('/')}/admin/endpoints/{endpoint}", token,
        content=content, headers={"content-type": content_type},
    )
    console.print(f"[green]route for {endpoint!r} applied[/green]")
    typer.echo(yaml.safe_dump(stored, sort_keys=False))


if __name__ == "__main__":
    app()
