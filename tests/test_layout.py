"""The package's folders are its layers (README "Layout"): each layer imports only the layers below it.

    core (attnviz/*.py) < formats/ < pagemodels/ < figures/ < app/

No page model imports another page model (what two pages share lives in the core), Streamlit is imported only
under attnviz/app/, the core and the figures import with Streamlit blocked, and the module paths of attnviz 0.1
(``attnviz.longseq``, ``attnviz.playground`` ...) are the same module objects as the new ones.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import attnviz

PACKAGE = Path(attnviz.__file__).resolve().parent
LAYERS = ("core", "formats", "pagemodels", "figures", "app")  # lowest first


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    if module == "attnviz.__main__":  # `python -m attnviz` is the app's command line
        return "app"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "core"


def _page_model(module: str) -> str | None:
    """The page a pagemodels module belongs to: attnviz.pagemodels.masklab.links -> masklab."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "pagemodels" else None


def _imports(path: Path) -> list[str]:
    """Every module an attnviz file imports, at any depth (lazy imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            # `from attnviz.pagemodels import masklab` imports the submodule attnviz.pagemodels.masklab
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _real(name: str) -> str:
    """An imported name as the attnviz module it names (`attnviz.engine.attention` -> attnviz.engine)."""
    parts = name.split(".")
    while parts:
        path = PACKAGE.parent.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return ""


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in SOURCES:
        module = _module_name(path)
        for imported in _imports(path):
            if not imported.startswith("attnviz."):
                continue
            target = _real(imported)
            if not target or target == "attnviz":
                continue
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
                wrong.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_page_model_imports_another():
    wrong = []
    for path in SOURCES:
        module = _module_name(path)
        own = _page_model(module)
        if own is None:
            continue
        for imported in _imports(path):
            other = _page_model(_real(imported)) if imported.startswith("attnviz.pagemodels.") else None
            if other is not None and other != own:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_streamlit_is_imported_only_under_app():
    wrong = [
        str(path.relative_to(PACKAGE.parent))
        for path in SOURCES
        if any(name.split(".")[0] == "streamlit" for name in _imports(path)) and _layer(_module_name(path)) != "app"
    ]
    assert not wrong, wrong


def test_the_package_uses_the_new_module_paths_itself():
    # The 0.1 names are for users' code; inside attnviz every import names the module where it lives.
    old = {name for name in attnviz.MOVED_MODULES}
    wrong = [
        f"{_module_name(path)} imports {imported}"
        for path in SOURCES
        for imported in _imports(path)
        if imported in old or any(imported.startswith(name + ".") for name in old)
    ]
    assert not wrong, wrong


def test_everything_below_the_app_imports_with_streamlit_blocked():
    modules = [
        _module_name(path) for path in SOURCES if _layer(_module_name(path)) != "app" and path.name != "__main__.py"
    ]
    code = "import importlib, sys\nsys.modules['streamlit'] = None\n" + "".join(
        f"importlib.import_module({name!r})\n" for name in modules
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 30  # the whole library, not an empty list


@pytest.mark.parametrize("old, new", sorted(attnviz.MOVED_MODULES.items()))
def test_old_module_paths_are_the_same_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    leaf = old.rpartition(".")[2]
    assert getattr(attnviz, leaf) is importlib.import_module(new)


def test_public_api_of_the_readme():
    from attnviz import interop, longseq, masks, models  # noqa: F401
    from attnviz.engine import attention_output, probability_tiles  # noqa: F401

    assert attnviz.MultiHeadAttention and attnviz.attention and attnviz.AttentionResult
    assert callable(attnviz.figures.attention_heads_figure)
    assert callable(longseq.analyze) and longseq.LongConfig
    assert callable(attnviz.interop.from_torch) and callable(attnviz.interop.from_keras)
    for name in attnviz.__all__:
        assert getattr(attnviz, name) is not None, name


def test_page_scripts_and_config_are_package_data():
    from attnviz.app import cli, main

    assert cli.app_path() == PACKAGE / "app" / "main.py"
    for script, _, _ in main.PAGES:
        assert (main.PAGE_SCRIPTS / script).is_file(), script
    # The folder beside the main script must not be called pages/ (Streamlit's old automatic mode).
    assert not (PACKAGE / "app" / "pages").exists()
    flags = cli.config_flags()
    assert "--server.enableXsrfProtection=true" in flags and "--runner.postScriptGC=false" in flags
    assert any(flag.startswith("--server.maxUploadSize=") for flag in flags)
    # The checkout's .streamlit/config.toml (for `streamlit run app.py`) is the packaged file, not a copy.
    checkout = PACKAGE.parent / ".streamlit" / "config.toml"
    if checkout.exists():
        assert checkout.resolve() == cli.CONFIG_FILE.resolve()


def test_version_from_the_command_line():
    for command in (["-m", "attnviz", "--version"], ["-m", "attnviz.app.cli", "--version"]):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == f"attnviz {attnviz.__version__}"
