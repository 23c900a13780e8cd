"""The engine's import directions (DESIGN.md, "Layout").

It stays pure Python: it runs inside Slicer's Python and outside it, so it never imports Slicer's or Qt's modules
(the Slicer layer passes MRML data to it as files or numpy arrays), nor the Slicer side's own package
``AttentionUNetSlicer`` (which imports the engine, never the other way round). Inside it, each stage imports only
the stages below it (inference never imports training; only the command line's entry imports the command line),
checked on every import statement of every file, the ones inside functions included."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Set, Tuple

import AttentionUNetSegmentLib

FORBIDDEN = ("slicer", "qt", "ctk", "vtk", "mrml", "AttentionUNetSlicer")


def test_importing_every_engine_module_loads_no_slicer_qt_ctk_vtk_or_slicer_package():
    modules = [m.name for m in pkgutil.walk_packages(AttentionUNetSegmentLib.__path__, "AttentionUNetSegmentLib.")
               if m.name != "AttentionUNetSegmentLib.__main__"]  # that one runs the CLI
    assert {"AttentionUNetSegmentLib.inference.predictor", "AttentionUNetSegmentLib.training.trainer",
            "AttentionUNetSegmentLib.cli.commands"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


LIBRARY = Path(AttentionUNetSegmentLib.__file__).parent
SLICER_PACKAGE = LIBRARY.parent / "AttentionUNetSlicer"
#: The engine's modules at the top of the package, shared by every stage; they import only each other.
SHARED = {"constants", "errors", "progress", "devices", "__init__"}
#: The stages each stage may import (besides the shared modules): a stage never imports one above it.
ALLOWED = {
    "fileio": set(),
    "preprocessing": {"fileio"},
    "model": {"fileio", "preprocessing"},
    "inference": {"fileio", "preprocessing", "model"},
    "training": {"fileio", "preprocessing", "model", "inference"},
    "evaluation": {"fileio", "preprocessing", "model", "inference", "training"},
    "cli": {"fileio", "preprocessing", "model", "inference", "training", "evaluation"},
    "__main__": {"cli"},
}


def _imports(path: Path, package: str) -> Iterator[Tuple[int, str]]:
    """``(line, dotted name)`` of every module ``path`` imports (relative imports resolved; for ``from X import
    y`` both ``X`` and ``X.y``, as ``y`` may be a module)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _engine_imports() -> Dict[str, Set[Tuple[int, str]]]:
    """For every engine file (``stage/module.py`` or ``module.py``), what it imports."""
    found: Dict[str, Set[Tuple[int, str]]] = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        relative = path.relative_to(LIBRARY)
        package = ".".join(("AttentionUNetSegmentLib", *relative.parts[:-1]))
        found[relative.as_posix()] = set(_imports(path, package))
    return found


def _stage(name: str) -> str:
    """The stage (subpackage) or shared module a dotted engine name belongs to."""
    return name.split(".")[1].split(" ")[0] if name.count(".") else "__init__"


def test_each_stage_imports_only_the_stages_below_it():
    wrong = []
    for file, imports in _engine_imports().items():
        stage = file.split("/")[0] if "/" in file else file[: -len(".py")]
        for line, name in imports:
            if not name.startswith("AttentionUNetSegmentLib"):
                continue
            target = _stage(name)
            if target == stage or target in SHARED or target == "__version__":
                continue
            allowed = set() if stage in SHARED else ALLOWED[stage]
            if target not in allowed:
                wrong.append(f"{file}:{line} imports {name}")
    assert wrong == []


def test_inference_never_imports_training_and_only_the_entry_imports_the_cli():
    """The two rules the layout exists for, spelled out (the table above implies them)."""
    for file, imports in _engine_imports().items():
        names = {name for _, name in imports}
        if file.startswith("inference/"):
            assert not {n for n in names if n.startswith("AttentionUNetSegmentLib.training")}, file
        if not (file.startswith("cli/") or file == "__main__.py"):
            assert not {n for n in names if n.startswith("AttentionUNetSegmentLib.cli")}, file


def test_no_engine_file_imports_slicer_qt_ctk_vtk_or_the_slicer_package():
    """Statically, every import statement (also those inside functions, which importing the modules misses)."""
    wrong = [f"{file}:{line} imports {name}" for file, imports in _engine_imports().items() for line, name in imports
             if name.split(".")[0] in FORBIDDEN]
    assert wrong == []


def _exception_classes(path: Path) -> Iterator[Tuple[str, Tuple[str, ...]]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            yield node.name, tuple(base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                                   for base in node.bases)


def test_every_error_class_descends_from_the_one_root():
    """``AttentionUNetError`` is the one exception root of the engine and of the Slicer package: every exception
    class either of them defines is a kind of it (checked by name through each file's classes)."""
    classes: Dict[str, Tuple[str, ...]] = {}
    for path in [*LIBRARY.rglob("*.py"), *SLICER_PACKAGE.rglob("*.py")]:
        classes.update(_exception_classes(path))
    builtin = {name for name, value in vars(builtins).items() if inspect.isclass(value)
               and issubclass(value, BaseException)}

    def root(name: str) -> Optional[str]:
        """``AttentionUNetError``, the built-in exception the class descends from, or None (not an exception)."""
        if name == "AttentionUNetError" or name in builtin:
            return name
        found = [root(base) for base in classes.get(name, ())]
        return "AttentionUNetError" if "AttentionUNetError" in found else next(filter(None, found), None)

    errors = {name: root(name) for name in classes if name != "AttentionUNetError" and root(name)}
    assert {"UsageError", "InputsFailedError", "AttentionUNetSegmentError"} <= set(errors)
    assert {name: base for name, base in errors.items() if base != "AttentionUNetError"} == {}


REPO = LIBRARY.parents[1]
STAGES = sorted(path.parent.name for path in LIBRARY.glob("*/__init__.py"))


def _resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` names something: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


def test_every_engine_name_the_repository_writes_exists():
    """The engine's modules moved (flat files -> one subpackage per stage): every place that names one, in code
    that the suite does not import (benchmarks, Resources scripts, lazy imports), in docstrings, the docs or
    pyproject.toml, names one that exists: dotted names ``AttentionUNetSegmentLib.<stage>.<module>...`` (and
    ``<module>:<name>`` entry points), paths ``AttentionUNetSegmentLib/<stage>/<module>.py``, and a backticked
    ``stage.module.name`` or ``stage.Class`` (lower-case ``stage.key`` without a module of that name is a bundle
    ``model.json`` key, not code)."""
    files = [*REPO.glob("*.md"), *REPO.glob("*.toml")] + [
        path for root in ("AttentionUNetSegment", "Testing", "Resources") for path in sorted((REPO / root).rglob("*"))
        if path.suffix in {".py", ".md", ".txt", ".toml"}]
    stale = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(REPO).as_posix()
        for match in re.finditer(r"AttentionUNetSegmentLib((?:\.[A-Za-z_]\w*)+)(?::(\w+))?", text):
            name = "AttentionUNetSegmentLib" + match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
            # resources: a wheel's package (pyproject's package-dir); __main__ runs the CLI when imported
            if not name.startswith(("AttentionUNetSegmentLib.resources", "AttentionUNetSegmentLib.__main__")) \
                    and not _resolves(name):
                stale.append(f"{where}: {name}")
        stale += [f"{where}: {match.group(0)}" for match in re.finditer(r"AttentionUNetSegmentLib/([\w/]+\.py)", text)
                  if not (LIBRARY / match.group(1)).is_file()]
        for match in re.finditer(r"`(%s)\.([A-Za-z_]\w*)((?:\.\w+)*)[`(]" % "|".join(STAGES), text):
            stage, second, rest = match.groups()
            if (LIBRARY / stage / f"{second}.py").is_file():
                if not _resolves(f"AttentionUNetSegmentLib.{stage}.{second}{rest}"):
                    stale.append(f"{where}: {match.group(0)}")
            elif second[0].isupper():
                stale.append(f"{where}: {match.group(0)}")
    assert len(files) > 100 and stale == []


def test_every_json_or_text_input_goes_through_the_one_reader():
    """``fileio.jsonfile`` is the one reader of JSON documents and of the text lists beside them (size cap, regular
    file, one user error): no other engine file parses JSON or reads a whole file as text or bytes."""
    wrong = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.relative_to(LIBRARY).as_posix() == "fileio/jsonfile.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            parses = name in {"load", "loads"} and getattr(node.func.value, "id", None) == "json"
            copies = parses and node.args and isinstance(node.args[0], ast.Call) \
                and getattr(node.args[0].func, "attr", None) == "dumps"  # json.loads(json.dumps(x)): a deep copy
            if (parses and not copies) or name in {"read_text", "read_bytes"}:
                wrong.append(f"{path.relative_to(LIBRARY)}:{node.lineno} {name}")
    assert wrong == []
