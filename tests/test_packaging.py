"""The runtime dependencies are complete: every third-party module the library imports (at module
level or lazily inside a function) is declared, directly or through a declared package, in
pyproject's ``dependencies`` — not only in the dev extras, which once hid a missing ``accelerate``
behind a green CI. With ``DELTATUNE_RUNTIME_VENV`` (set by ``make test``), the runtime-only
environment that CI builds is checked too: each such module is importable there."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "deltatune"

# Imported only on a path that says what to install when it is missing; each with the reason.
OPTIONAL = {
    "bitsandbytes": "quant/optim8bit.py: PagedAdamW on CUDA delegates to bitsandbytes when the user has it",
}
# Not imported by deltatune itself but needed at run time by what it calls.
INDIRECT = {
    "accelerate": "transformers refuses to load a GGUF file (the default model) without it",
    "gguf": "transformers' GGUF reader",
}


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> files importing it (absolute imports only; stdlib excluded)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("deltatune", "__future__"):
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _req_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _runtime_closure() -> set[str]:
    """Distributions installed by ``pip install .``: the declared dependencies and, transitively,
    theirs (read from the installed metadata; requirements behind an extra are not followed)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [_req_name(r) for r in declared]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [_req_name(r) for r in reqs if "extra ==" not in r]
    return seen


def _distributions_of(module: str) -> set[str]:
    dists = md.packages_distributions().get(module, [])
    return {d.lower().replace("_", "-") for d in dists}


def test_every_runtime_import_is_a_runtime_dependency() -> None:
    closure = _runtime_closure()
    imports = _third_party_imports()
    assert "torch" in imports and "transformers" in imports  # the scan sees the library's imports
    missing = []
    for module, files in sorted(imports.items()):
        if module in OPTIONAL:
            continue
        dists = _distributions_of(module)
        assert dists, f"{module} (imported by {files[0]}) is not installed in the test environment"
        if not dists & closure:
            missing.append(f"{module} (distribution {sorted(dists)}; imported by {', '.join(sorted(set(files)))})")
    for module, why in INDIRECT.items():
        if not _distributions_of(module) & closure:
            missing.append(f"{module} ({why})")
    assert not missing, "imported at run time but not in pyproject's dependencies:\n  " + "\n  ".join(missing)


def test_optional_imports_are_still_imported() -> None:
    """An allow-list entry for a module nothing imports any more is stale."""
    imports = _third_party_imports()
    assert set(OPTIONAL) <= set(imports), set(OPTIONAL) - set(imports)


def test_runtime_only_environment_has_every_import() -> None:
    venv = os.environ.get("DELTATUNE_RUNTIME_VENV")
    if not venv:
        if os.environ.get("CI"):
            pytest.fail("CI must run this with DELTATUNE_RUNTIME_VENV (make test sets it)")
        pytest.skip("DELTATUNE_RUNTIME_VENV not set (make test sets it after building the runtime environment)")
    python = (ROOT / venv / "bin" / "python") if not Path(venv).is_absolute() else Path(venv) / "bin" / "python"
    assert python.exists(), f"{python}: the runtime-only environment is missing (make setup-runtime)"
    modules = sorted((set(_third_party_imports()) - set(OPTIONAL)) | set(INDIRECT))
    # Every deltatune module imports, and every third-party module the code imports lazily is found.
    script = (
        "import importlib, importlib.util, pkgutil, sys\n"
        "import deltatune\n"
        "for m in pkgutil.walk_packages(deltatune.__path__, 'deltatune.'):\n"
        "    importlib.import_module(m.name)\n"
        f"missing = [m for m in {modules!r} if importlib.util.find_spec(m) is None]\n"
        "print(deltatune.__file__)\n"
        "sys.exit('missing in the runtime environment: ' + ', '.join(missing) if missing else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "site-packages" in done.stdout, f"not the installed wheel: {done.stdout}"
    # and no dev extra leaked into it
    pip = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    installed = {_req_name(line) for line in pip.stdout.splitlines() if line}
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    leaked = {_req_name(r) for r in dev} & installed - _runtime_closure()
    assert not leaked, f"dev-only packages in the runtime environment: {sorted(leaked)}"
