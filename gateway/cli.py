"""The `gatewatch` command line. Environment variables are read here (and by pydantic-settings), nowhere below."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console

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
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "log_level": log_level,
        "timeout_graceful_shutdown": settings.shutdown_timeout_seconds,
        "access_log": False,
    }
    console.print(f"gatewatch serving {settings.registry} on http://{host}:{port} (workers: {settings.workers})")
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


if __name__ == "__main__":
    app()
