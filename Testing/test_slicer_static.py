"""Static checks of what cannot run outside the Slicer application: the .ui against the code, parameter bindings,
every Slicer API call against Slicer's real API (``../shared/slicer-api/api.json``), CMake lists against the files,
a real CMake configure against a stand-in Slicer, and the extension catalog entry against its real schema."""

from __future__ import annotations

import ast
import builtins
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from AttentionUNetSegmentLib import constants

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "AttentionUNetSegment"
MODULE_FILE = MODULE_DIR / "AttentionUNetSegment.py"
SLICER_PACKAGE = MODULE_DIR / "AttentionUNetSlicer"
#: The files that call Slicer's API: the entry file and the Slicer package, less its engine-process client (plain
#: Python, tested against real child processes in test_slicer_engineProcess.py).
SLICER_FILES = [MODULE_FILE] + sorted(p for p in SLICER_PACKAGE.glob("*.py") if p.name != "engineProcess.py")
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AttentionUNetSegment.ui"
API_FILE = ROOT.parent / "shared" / "slicer-api" / "api.json"
STAND_IN = Path(__file__).resolve().parent / "cmake"
#: Qt signals used on plain Q* widgets (PythonQt wraps Qt classes in full; these are Qt 5 signal signatures).
QT_SIGNALS = {"clicked(bool)", "currentIndexChanged(int)", "timeout()", "toggled(bool)"}
#: Members of QWidget/QAbstractButton every widget has (PythonQt exposes the full Qt API of Q* classes).
QT_WIDGET_MEMBERS = {"enabled", "toolTip", "visible", "setVisible", "setEnabled", "connect", "text", "blockSignals"}
#: Call owners that are not MRML/VTK objects (module/class constructors, Qt, Python's pathlib).
NON_MRML_OWNERS = {"slicer", "vtk", "qt", "pathlib", "contextlib", "PyTorchUtils", "SampleData.SampleDataLogic",
                   "slicer.util"}
SUPPORTED_RELEASES = ("v5.12.3", "v5.10.0")  # the oldest Slicer supported (5.8) has the 5.10 API used here


@pytest.fixture(scope="module")
def api() -> dict:
    if not API_FILE.is_file():
        pytest.skip(f"Slicer API reference not found at {API_FILE}")
    return json.loads(API_FILE.read_text())


def _source() -> str:
    return "\n".join(path.read_text() for path in SLICER_FILES)


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    """Every Slicer-layer file as one module (each parsed on its own, bodies joined in file order)."""
    body = []
    for path in SLICER_FILES:
        body += ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9)).body
    return ast.Module(body=body, type_ignores=[])


def _ui_widgets() -> Dict[str, str]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _ui_bindings() -> Dict[str, Tuple[str, str]]:
    """widget name -> (class, SlicerParameterName)."""
    root = ET.parse(UI_FILE).getroot()
    bindings = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName needs stdset=0"
                bindings[widget.get("name")] = (widget.get("class"), prop.find("string").text)
    return bindings


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _parameter_class(tree: ast.Module) -> ast.ClassDef:
    """The parameterNodeWrapper class (made inside ``parameterNodeClass()``, on first use)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "AttentionUNetSegmentParameterNode":
            return node
    raise AssertionError("AttentionUNetSegmentParameterNode not found")


def _parameter_fields(tree: ast.Module) -> Dict[str, ast.AST]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "AttentionUNetSegmentParameterNode":
            assert any(_dotted(d) == "parameterNodeWrapper" for d in node.decorator_list)
            return {item.target.id: item.annotation for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("AttentionUNetSegmentParameterNode not found")


def _qt_members(api: dict, cls: str) -> Tuple[Set[str], bool]:
    """Names callable/readable from Python on a Slicer/CTK widget class and its ancestors, and whether a Q* base
    class (full Qt API) was reached."""
    widgets = api["qt_widgets"]
    names: Set[str] = set()
    while cls in widgets:
        entry = widgets[cls]
        names |= set(entry.get("properties", {}))
        for key in ("signals", "public_slots", "invokable_methods"):
            for item in entry.get(key, []):
                signature = item["signature"] if isinstance(item, dict) else item
                names.add(signature)
                names.add(signature.split("(")[0])
        cls = entry.get("superclass", "")
    return names, cls.startswith("Q")


# .ui <-> code


def test_every_widget_the_code_uses_exists_in_the_ui(tree):
    widgets = _ui_widgets()
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and _dotted(node.value) == "self.ui"}
    assert used, "the widget uses no .ui children?"
    assert sorted(used - set(widgets)) == []


def test_widget_members_exist_for_their_class(tree, api):
    widgets = _ui_widgets()
    problems = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and _dotted(node.value.value) == "self.ui"):
            continue
        name, member, cls = node.value.attr, node.attr, widgets.get(node.value.attr, "")
        if cls.startswith("Q"):
            continue  # full Qt API
        members, reaches_qt = _qt_members(api, cls)
        assert members, f"{cls} (widget {name}) is not a Slicer/CTK widget known to api.json"
        if member not in members and not (reaches_qt and member in QT_WIDGET_MEMBERS):
            problems.append(f"{name} ({cls}).{member}")
    assert problems == []


def test_signals_connected_by_string_exist(tree, api):
    widgets = _ui_widgets()
    problems = []
    for call in _calls(tree):
        if not (isinstance(call.func, ast.Attribute) and call.func.attr == "connect" and call.args
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            continue
        owner, signal = call.func.value, call.args[0].value
        if isinstance(owner, ast.Attribute) and _dotted(owner.value) == "self.ui":
            cls = widgets[owner.attr]
        elif _dotted(owner) == "self._pollTimer":
            cls = "QTimer"
        elif _dotted(owner) == "slicer.app":
            assert signal == "startupCompleted()"
            continue
        else:
            problems.append(f"unchecked connect on {ast.unparse(owner)}")
            continue
        members, reaches_qt = _qt_members(api, cls)
        if signal not in members and not ((cls.startswith("Q") or reaches_qt) and signal in QT_SIGNALS):
            problems.append(f"{cls}: {signal}")
    assert problems == []


def test_ui_properties_of_slicer_and_ctk_widgets_exist(api):
    generic = {"toolTip", "text", "enabled", "geometry", "SlicerParameterName"}  # QWidget / dynamic
    problems = []
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        cls = widget.get("class")
        if cls.startswith("Q"):
            continue
        members, _ = _qt_members(api, cls)
        for prop in widget.findall("property"):
            if prop.get("name") not in generic and prop.get("name") not in members:
                problems.append(f"{widget.get('name')} ({cls}).{prop.get('name')}")
    assert problems == []


def test_ui_custom_widgets_and_scene_connections_are_declared(api):
    root = ET.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.find("class").text: c for c in root.iter("customwidget")}
    used = {cls for cls in _ui_widgets().values() if not cls.startswith("Q")}
    assert used <= set(declared)
    for cls, element in declared.items():
        assert element.find("header").text == f"{cls}.h"
    top = root.find("widget").get("name")
    for connection in root.iter("connection"):
        assert connection.find("sender").text == top
        assert connection.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
        receiver_cls = _ui_widgets()[connection.find("receiver").text]
        assert "setMRMLScene(vtkMRMLScene*)" in _qt_members(api, receiver_cls)[0]
    mrml_widgets = {n for n, c in _ui_widgets().items() if c in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    assert mrml_widgets == {c.find("receiver").text for c in root.iter("connection")}


# parameterNodeWrapper bindings


def test_every_slicer_parameter_name_is_a_field_with_a_matching_connector(tree, api):
    fields = _parameter_fields(tree)
    connectors = api["parameterNodeWrapper"]["gui_connectors"]
    bindings = _ui_bindings()
    assert len(bindings) >= 10
    for widget, (cls, field) in bindings.items():
        assert field in fields, f"{widget}: SlicerParameterName {field!r} is not a parameter"
        annotation = ast.unparse(fields[field])
        base = annotation.split("[", 1)[1].split(",")[0] if annotation.startswith("Annotated[") else annotation
        node_class = base.removeprefix("slicer.").startswith("vtkMRML")
        datatype = ("vtkMRMLNode subclass (or Union/Optional of them)" if node_class else
                    "pathlib.Path" if base == "pathlib.Path" else base)
        matching = [c for c in connectors if cls in c["widgets"] and datatype in c["datatypes"]]
        assert matching, f"{widget} ({cls}) cannot bind {field}: {annotation}"
        notes = " ".join(matching[0].get("notes", []))
        if "requires Annotated[..., Choice" in notes:
            choices = ast.literal_eval(re.search(r"Choice\((.*)\)\]", annotation).group(1).replace(
                "list(DEVICES)", repr(list(constants.DEVICES))).replace(
                "list(OUTPUT_FORMATS)", repr(list(constants.OUTPUT_FORMATS))))
            root = ET.parse(UI_FILE).getroot()
            element = next(w for w in root.iter("widget") if w.get("name") == widget)
            items = [i.find("property/string").text for i in element.findall("item")]
            assert items == choices, f"{widget}: items {items} differ from Choice {choices}"
        if "unbounded" in notes:
            assert "WithinRange" in annotation, f"{widget} binds {field} without bounds (RuntimeError in Slicer)"


def test_device_format_and_model_names_are_the_engines_own(tree):
    """The Slicer layer spells no device, output format or default model: it imports the engine's definitions."""
    assert constants.DEVICES == ("auto", "cpu", "cuda") and constants.OUTPUT_FORMATS == ("nii.gz", "nrrd")
    spelled = [constants.DEVICES, constants.OUTPUT_FORMATS, constants.DEFAULT_MODEL]
    assigned = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if value in spelled and not isinstance(node, ast.AnnAssign):  # a field's default is a use
                assigned.append(ast.unparse(node))
    assert assigned == []
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "AttentionUNetSegmentLib.constants" for alias in node.names}
    assert {"DEFAULT_MODEL", "DEVICES", "OUTPUT_FORMATS"} <= imported


# Slicer API calls


def _check_call(spec: dict, call: ast.Call, where: str) -> List[str]:
    problems = []
    positional = len(call.args)
    if any(isinstance(a, ast.Starred) for a in call.args):
        return problems
    if positional < spec["min_positional"] - len(call.keywords) or (
            spec["max_positional"] is not None and positional > spec["max_positional"]):
        problems.append(f"{where}: {positional} positional arguments, expected {spec['params']}")
    for keyword in call.keywords:
        if keyword.arg and keyword.arg not in spec["keyword_names"] and not spec["var_kwargs"]:
            problems.append(f"{where}: unknown keyword {keyword.arg}")
    return problems


def _params_ok_in(params: str, call: ast.Call) -> bool:
    names = [p.split("=")[0].strip() for p in params.split(",") if p.strip() and not p.strip().startswith("*")]
    return len(call.args) <= len(names) and all(k.arg in names for k in call.keywords)


def test_slicer_util_calls_exist_with_valid_arguments_in_supported_releases(tree, api):
    util = api["slicer.util"]
    problems, used = [], set()
    for call in _calls(tree):
        name = _dotted(call.func)
        if not name.startswith("slicer.util."):
            continue
        function = name.split(".", 2)[2]
        used.add(function)
        spec = util["functions"].get(function)
        if spec is None:
            if function not in util["classes"]:
                problems.append(f"slicer.util.{function} does not exist")
            continue
        problems += _check_call(spec, call, name)
        for release in SUPPORTED_RELEASES:
            if function in util["not_in_release"].get(release, []):
                problems.append(f"{name} is not in Slicer {release}")
            older = util["params_differ_in_release"].get(release, {}).get(function)
            if older is not None and not _params_ok_in(older, call):
                problems.append(f"{name}: arguments do not fit Slicer {release} ({older})")
    assert {"loadUI", "childWidgetVariables", "setSliceViewerLayers", "arrayFromVolume"} <= used
    assert problems == []


def test_packaging_and_pytorchutils_calls_match_the_api(tree, api):
    problems = []
    for call in _calls(tree):
        name = _dotted(call.func)
        if name.startswith("packaging."):
            problems += _check_call(api["slicer.packaging"]["functions"][name.split(".")[1]], call, name)
        if name.startswith("torchLogic."):
            methods = api["PyTorchUtils"]["classes"]["PyTorchUtilsLogic"]["methods"]
            problems += _check_call(methods[name.split(".")[1]], call, name)
        if name == "PyTorchUtils.PyTorchUtilsLogic":
            assert not call.args
    assert problems == []
    source = _source()
    assert 'pip_install("torch' not in source and "pip_install(['torch" not in source


def _vtk_methods(api: dict) -> Dict[str, List[dict]]:
    """Method name -> overload specs, over every MRML/VTK class of the reference (and python-missing names)."""
    methods: Dict[str, List[dict]] = {}
    for cls, entry in api["vtk_classes"].items():
        missing = set(entry.get("python_check", {}).get("declared_not_in_python", []))
        for name in entry["methods"]:
            if name in missing:
                continue
            methods.setdefault(name, []).extend(entry.get("overloads", {}).get(name, [{"min": 0, "max": None}]))
    for entry in api["vtk_base_classes"].values():
        for name in entry.get("methods", []):
            methods.setdefault(name, []).append({"min": 0, "max": None})
    return methods


def test_mrml_and_vtk_methods_called_exist_with_a_fitting_overload(tree, api):
    vtk = pytest.importorskip("vtk")
    methods = _vtk_methods(api)
    problems = []
    for call in _calls(tree):
        if not isinstance(call.func, ast.Attribute):
            continue
        name, owner = call.func.attr, _dotted(call.func.value)
        if not name[:1].isupper() or owner in NON_MRML_OWNERS or owner.startswith("self.ui"):
            continue  # constructors, Qt, Python modules
        if name not in methods and owner == "nodes" and hasattr(vtk.vtkCollection, name):
            continue  # scene.GetNodesByClass returns a plain vtkCollection
        if name not in methods:
            problems.append(f"{ast.unparse(call.func)}: no MRML/VTK class has {name}")
            continue
        count = len(call.args)
        if not any(o.get("min", 0) <= count <= (o.get("max") if o.get("max") is not None else 99)
                   for o in methods[name]):
            problems.append(f"{ast.unparse(call)[:80]}: {count} arguments fit no overload")
    assert problems == []


def test_mrml_classes_and_constants_exist(tree, api):
    classes = api["vtk_classes"]
    source = _source()
    slicer = pytest.importorskip("slicer")
    for name in set(re.findall(r'"(vtkMRML\w+)"', source)):  # class names in AddNewNodeByClass / IsA
        assert name in classes or hasattr(slicer, name), f"{name} is not an MRML class"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node).startswith("slicer.vtk"):
            parts = _dotted(node).split(".")
            assert parts[1] in classes, f"slicer.{parts[1]} unknown"
            if len(parts) == 3 and parts[2][:1].isupper() and parts[2] not in classes[parts[1]]["methods"]:
                cls, found = parts[1], False
                while cls in classes:
                    found |= parts[2] in classes[cls].get("constants", {})
                    cls = classes[cls].get("superclass")
                assert found, f"{_dotted(node)} is not a constant"
    ids = set()
    for value in api["color_node_ids"].values():
        if isinstance(value, list):
            ids |= {v for v in value if isinstance(v, str)}
    assert "vtkMRMLColorTableNodeFileInferno.txt" in ids
    for event in ("StartCloseEvent", "EndCloseEvent"):
        assert event in classes["vtkMRMLScene"]["constants"]


def test_module_structure_follows_scripted_module_conventions(tree, api):
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    expected = {"AttentionUNetSegment": "ScriptedLoadableModule",
                "AttentionUNetSegmentWidget": "ScriptedLoadableModuleWidget",
                "AttentionUNetSegmentLogic": "ScriptedLoadableModuleLogic",
                "AttentionUNetSegmentTest": "ScriptedLoadableModuleTest"}

    def ancestors(name):
        bases = [_dotted(b) for b in classes[name].bases] if name in classes else []
        return set(bases).union(*(ancestors(b) for b in bases))

    for name, base in expected.items():
        assert base in ancestors(name), f"{name} does not derive from {base}"
    # Slicer looks the classes up by name in the entry file (the Logic and the panel may come from the package)
    entry = {n.name for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ClassDef)} | {
        a.asname or a.name for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ImportFrom)
        for a in n.names}
    assert set(expected) <= entry
    allowed = set(api["ScriptedLoadableModule"]["classes"]["ScriptedLoadableModule"]["parent_attributes_set_in_init"])
    used = {node.attr for node in ast.walk(classes["AttentionUNetSegment"])
            if isinstance(node, ast.Attribute) and _dotted(node.value) == "self.parent"}
    assert used <= allowed
    tests = [n.name for n in classes["AttentionUNetSegmentTest"].body if isinstance(n, ast.FunctionDef)]
    assert "setUp" in tests and any(t.startswith("test_") for t in tests)


def test_nothing_heavy_is_imported_at_module_scope(tree):
    heavy = {"torch", "numpy", "SimpleITK", "scipy", "nibabel", "safetensors"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & heavy
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in heavy
    code = ("import sys; sys.path.insert(0, %r); from slicer_module_shims import load_module; load_module(); "
            "bad = sorted(m for m in %r if m in sys.modules); print(bad); raise SystemExit(1 if bad else 0)"
            % (str(Path(__file__).resolve().parent), sorted(heavy - {"numpy"})))  # Slicer itself loads numpy
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_names(module: ast.Module) -> Set[str]:
    """Names a module defines at its top level, those imported under ``if TYPE_CHECKING:`` included."""
    names: Set[str] = set()
    statements = list(module.body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
        elif isinstance(node, (ast.If, ast.Try)):
            statements += node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


def _annotation_names(module: ast.Module) -> Iterator[Tuple[int, str]]:
    """``(line, name)`` of every name an annotation uses, inside quoted annotations too."""
    annotations = []
    for node in ast.walk(module):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            annotations += [a.annotation for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                                   arguments.vararg, arguments.kwarg] if a is not None]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    for annotation in filter(None, annotations):
        for node in ast.walk(annotation):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield from ((node.lineno, n.id) for n in ast.walk(ast.parse(node.value, mode="eval"))
                            if isinstance(n, ast.Name))
            elif isinstance(node, ast.Name):
                yield node.lineno, node.id


def test_every_name_an_annotation_uses_is_defined():
    """What pyflakes reports as F821 in annotations (``from __future__ import annotations`` hides it at run time,
    ``typing.get_type_hints`` and readers do not): a class named only in an annotation is imported under
    ``if TYPE_CHECKING:``, so no import cycle exists at run time."""
    undefined = []
    for path in [MODULE_FILE, *sorted(SLICER_PACKAGE.glob("*.py"))]:
        module = ast.parse(path.read_text(), filename=str(path))
        known = _module_names(module) | set(dir(builtins))
        undefined += [f"{path.name}:{line}: {name}" for line, name in _annotation_names(module) if name not in known]
    assert not undefined, "undefined names in annotations:\n" + "\n".join(undefined)


# CMake and extension metadata


def _cmake_list(text: str, variable: str) -> List[str]:
    block = re.search(r"set\(%s\n(.*?)\n\s*\)" % variable, text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "AttentionUNetSegment") for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_every_script_and_resource_is_listed_in_cmake():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_scripts = ["AttentionUNetSegment.py"] + sorted(
        p.relative_to(MODULE_DIR).as_posix() for package in ("AttentionUNetSlicer", "AttentionUNetSegmentLib")
        for p in (MODULE_DIR / package).rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(set(on_disk_scripts) - set(scripts)) == [], "scripts missing from MODULE_PYTHON_SCRIPTS"
    assert sorted(set(scripts) - set(on_disk_scripts)) == [], "listed scripts that do not exist"
    on_disk_resources = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                               if p.is_file() and "__pycache__" not in p.parts)
    assert sorted(set(on_disk_resources) - set(resources)) == [], "resources missing from MODULE_PYTHON_RESOURCES"
    assert sorted(set(resources) - set(on_disk_resources)) == [], "listed resources that do not exist"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest.*endif\(\)", text, re.S)
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text().strip() == "add_subdirectory(Python)"
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_top_level_cmake_follows_the_extension_template(api):
    text = (ROOT / "CMakeLists.txt").read_text()
    template = api["extension_metadata"]["extension_cmakelists_template"]
    order = [text.index(s) for s in ("cmake_minimum_required(", "project(AttentionUNet)",
                                     "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(AttentionUNetSegment)", "## NEXT_MODULE",
                                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)
    for variable in template["EXTENSION_variables"]:
        value = re.search(r'set\(%s "([^"]*)"\)' % variable, text).group(1)
        assert value and value != "NA", variable


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_against_a_stand_in_slicer(tmp_path):
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DSlicer_DIR={STAND_IN}",
                             "-DBUILD_TESTING=ON"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = [line.split("|", 1) for line in (tmp_path / "slicer-stand-in.txt").read_text().splitlines()]
    values: Dict[str, List[str]] = {}
    for key, value in record:
        values.setdefault(key, []).append(value)
    assert values["MODULE"] == ["AttentionUNetSegment"]
    assert values["PYTHON_UNITTEST"] == ["py_AttentionUNetSegment"]
    assert values["EXTENSION_NAME"] == ["AttentionUNet"] and values["CPACK"] == ["AttentionUNet"]
    assert "AttentionUNetSegment/AttentionUNetSlicer/engineProcess.py" in values["SCRIPT"]
    assert "AttentionUNetSegment/Resources/UI/AttentionUNetSegment.ui" in values["RESOURCE"]
    catalog = json.loads((ROOT / "AttentionUNet.json").read_text())
    assert values["EXTENSION_DEPENDS"][0].split(";") == catalog["build_dependencies"]


def test_catalog_entry_is_valid_against_the_real_schema(api):
    path = ROOT / "AttentionUNet.json"
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n"), "the catalog entry must use LF line endings"
    entry = json.loads(raw)
    metadata = api["extension_metadata"]
    schemas = {s["id"]: s for s in metadata["catalog_entry_json_schemas"].values()}
    schema = schemas[entry["$schema"]]
    assert set(schema["required"]) <= set(entry)
    assert set(entry) <= set(schema["properties"])  # additionalProperties: false
    types = {"string": str, "array": list, "boolean": bool, "integer": int}
    for key, value in entry.items():
        spec = schema["properties"][key]
        assert isinstance(value, types[spec["type"]]), key
        if "enum" in spec:
            assert value in spec["enum"]
        if "minimum" in spec:
            assert spec["minimum"] <= value <= spec["maximum"]
    index = metadata["extensions_index"]
    assert entry["category"] in index["accepted_categories"]
    project = re.search(r"project\((\w+)\)", (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert path.stem == project and not project.startswith("Slicer")
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert entry["build_dependencies"] == depends.split(";") == ["PyTorch"]
    repository = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert any(repository.startswith(prefix) for prefix in index["repository_name_prefixes_allowed"])
    assert any((ROOT / name).is_file() for name in index["license_file_names"])


def test_s4ext_uses_known_keys(api):
    """Slicer's own keys only (its values are compared in ``test_extension_metadata_agrees_everywhere``)."""
    keys = set(api["extension_metadata"]["s4ext"]["keys"])
    for line in (ROOT / "AttentionUNet.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.partition(" ")[0] in keys, line


def _png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_icons_are_128_pixel_pngs_and_urls_point_at_committed_files():
    assert _png_size(ROOT / "Resources" / "AttentionUNet.png") == (128, 128)
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "AttentionUNetSegment.png") == (128, 128)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in re.search(r'set\(%s "([^"]*)"\)' % variable, cmake).group(1).split():
            relative = url.split("/main/", 1)[1]
            assert (ROOT / relative).is_file(), f"{variable} points at {relative}, which is not in the repository"


def test_locate_automatically_checkbox_is_bound_on_by_default_and_follows_the_model(tree):
    """The "Locate automatically" checkbox: in the .ui, bound to a ``bool`` parameter that defaults to on, and shown
    and enabled by the widget from the selected model (a localiser) and the Region (which wins over it)."""
    assert _ui_widgets()["locateAutomaticallyCheckBox"] == "QCheckBox"
    assert _ui_bindings()["locateAutomaticallyCheckBox"] == ("QCheckBox", "locateAutomatically")
    element = next(w for w in ET.parse(UI_FILE).getroot().iter("widget")
                   if w.get("name") == "locateAutomaticallyCheckBox")
    assert element.find("property[@name='text']/string").text == "Locate automatically"
    assert element.find("property[@name='checked']/bool").text == "true"
    wrapper = _parameter_class(tree)
    (field,) = [item for item in wrapper.body if isinstance(item, ast.AnnAssign)
                and item.target.id == "locateAutomatically"]
    assert ast.unparse(field.annotation) == "bool" and ast.literal_eval(field.value) is True
    assigned = {node.targets[0].attr: ast.unparse(node.value) for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and _dotted(node.targets[0].value) == "self.ui.locateAutomaticallyCheckBox"}
    assert "hasLocalizer" in assigned["visible"]
    assert "hasLocalizer" in assigned["enabled"] and "roi" in assigned["enabled"]
    options = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _dotted(node.func) ==
               "SegmentationOptions" and any(k.arg == "locateAutomatically" for k in node.keywords)]
    assert options, "the panel's choice never reaches the run's options"


#: ctkDICOMDatabase members the module may use, as CTK declares them (``Libs/DICOM/Core/ctkDICOMDatabase.h``:
#: ``Q_PROPERTY(bool isOpen ...)``, ``Q_INVOKABLE QString fileForInstance(const QString sopInstanceUID)``,
#: ``Q_INVOKABLE void insert(const QString& filePath, bool storeFile = true, bool generateThumbnail = true, bool
#: createHierarchy = true, const QString& destinationDirectoryName = QString())``; api.json does not cover CTK's
#: DICOM classes): name -> (fewest, most) positional arguments, None for a property.
CTK_DICOM_DATABASE = {"isOpen": None, "fileForInstance": (1, 1), "insert": (1, 5)}


def test_dicom_export_uses_only_real_dicom_database_members_and_no_dicom_library(tree):
    problems, used = [], set()
    calls = {id(call.func): call for call in _calls(tree)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _dotted(node.value) in ("database", "slicer.dicomDatabase")):
            continue
        used.add(node.attr)
        if node.attr not in CTK_DICOM_DATABASE:
            problems.append(f"ctkDICOMDatabase has no {node.attr} the module may use")
            continue
        call, arity = calls.get(id(node)), CTK_DICOM_DATABASE[node.attr]
        if (arity is None) != (call is None) or (call is not None and not arity[0] <= len(call.args) <= arity[1]):
            problems.append(f"{ast.unparse(call or node)}: does not fit ctkDICOMDatabase.{node.attr}")
    assert problems == [] and used == set(CTK_DICOM_DATABASE)
    source = _source()
    # the attribute DICOMScalarVolumePlugin sets (SOP Instance UIDs, space-separated)
    assert 'DICOM_INSTANCE_UIDS = "DICOM.instanceUIDs"' in source and "GetAttribute(DICOM_INSTANCE_UIDS)" in source
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {(node.module or "").split(".")[0] for node in ast.walk(tree)
                                           if isinstance(node, ast.ImportFrom)}
    assert not imported & {"highdicom", "pydicom", "dcmqi"}, "the DICOM SEG is written by the engine process"
    requirements = (MODULE_DIR / "Resources" / "requirements-dicom.txt").read_text()
    assert "highdicom" in requirements and "pydicom" in requirements


# What a real Slicer would break (issue 12): checks of the Qt-only code paths the tests cannot run


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found")


def _called(node: ast.AST) -> List[str]:
    return [_dotted(call.func) for call in _calls(node)]


def test_the_panel_binds_each_parameter_node_wrapper_once(tree):
    """Slicer 5.8.1's ``_connectGui`` returns no tag, so ``disconnectGui`` cannot undo a ``connectGui``: the panel
    keeps its binding over exit/enter and binds again only for another wrapper (the Logic keeps one per node)."""
    assert "self._disconnectParameterNode" not in _called(_method(tree, "PanelWidget", "exit"))
    assert "self.setParameterNode" not in _called(_method(tree, "PanelWidget", "onSceneStartClose"))
    first = _method(tree, "PanelWidget", "setParameterNode").body[1]  # after the docstring
    assert isinstance(first, ast.If) and ast.unparse(first.test) == "inputParameterNode is self._parameterNode"
    assert isinstance(first.body[0], ast.Return)
    assert "parameterNode is not node" in ast.unparse(_method(tree, "AttentionUNetSegmentLogic", "getParameterNode"))


def test_device_detection_never_waits_on_the_gui_thread(tree):
    """Expanding Advanced starts a query through the engine-process client; the poll timer collects it."""
    assert not [name for name in _called(tree) if name.startswith("subprocess.")], "a blocking subprocess call"
    collapsed = _called(_method(tree, "PanelWidget", "onAdvancedCollapsed"))
    assert "self.logic.startDeviceQuery" in collapsed and "self._pollTimer.start" in collapsed
    assert "slicer.util.WaitCursor" not in collapsed
    assert "query.poll" in _called(_method(tree, "PanelWidget", "onPollJob"))


def test_cancel_never_waits_for_the_engine_on_the_gui_thread(tree):
    """Cancel (Apply's, a scene close's, the device query giving up) only tells the engine to stop; the poll timer
    follows a cancelled run to its end (``_stopping``), so no Qt slot sleeps or waits for the process."""
    for handler in ("onApplyButton", "onSceneStartClose", "onPollJob"):
        calls = _called(_method(tree, "PanelWidget", handler))
        assert not [c for c in calls if c.endswith(".wait") or c == "time.sleep"], handler
    cancel = _method(tree, "PolledRun", "cancel")
    assert not [n for n in ast.walk(cancel) if isinstance(n, (ast.While, ast.For))]
    assert "self._stopping.append" in _called(_method(tree, "PanelWidget", "onSceneStartClose"))
    assert "self._stopping = [job for job in self._stopping if job.poll()]" in ast.unparse(
        _method(tree, "PanelWidget", "onPollJob"))


def test_closing_the_scene_stops_a_batch_without_building_its_table(tree):
    close = _method(tree, "PanelWidget", "onSceneStartClose")
    calls = [call for call in _calls(close) if _dotted(call.func) == "job.cancel"]
    assert any(k.arg == "sceneClosing" and ast.literal_eval(k.value) is True for c in calls for k in c.keywords)
    assert "self.logic.showTable" not in _called(close)


def test_installs_ask_and_report_before_the_wait_cursor(tree):
    """The dependencies step runs before ``WaitCursor`` (its questions are not under a busy cursor) and gets the
    panel's status callback; every button that may install passes its dependencies step."""
    run = _method(tree, "PanelWidget", "_runShowingErrors")
    body = ast.unparse(run)
    assert body.index("dependencies(statusCallback=self._showInstallStatus)") < body.index("slicer.util.WaitCursor()")
    for handler, step in (("onApplyButton", "self.logic.ensureDependencies"),
                          ("onBatchApplyButton", "self.logic.ensureDependencies"),
                          ("onExportReportButton", "self.logic.ensureReportDependencies"),
                          ("onExportButton", "self.logic.ensureDicomSegDependencies")):
        assert step in ast.unparse(_method(tree, "PanelWidget", handler)), handler
    assert "slicer.app.processEvents" in _called(_method(tree, "PanelWidget", "_showInstallStatus"))


def test_panel_errors_are_caught_and_shown_not_reraised(tree):
    """``tryWithErrorDisplay`` re-raises, so code after it never sees its failure: the panel catches, shows and
    returns instead (one helper), and no Qt slot lets an exception escape."""
    assert "slicer.util.tryWithErrorDisplay" not in _called(tree)
    run = _method(tree, "PanelWidget", "_runShowingErrors")
    (handler,) = [node for node in ast.walk(run) if isinstance(node, ast.ExceptHandler)]
    assert ast.unparse(handler.type) == "Exception"
    assert "slicer.util.errorDisplay" in _called(handler) and isinstance(handler.body[-1], ast.Return)
    export = _method(tree, "PanelWidget", "onExportButton")
    assert "self._runShowingErrors" in _called(export) and "existing is None" not in ast.unparse(export)


def test_temporary_folders_come_from_slicers_temporary_path(tree):
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "tempfile" not in imported
    assert "slicer.util.tempDirectory" in _called(tree)


def test_the_model_combo_box_follows_the_parameter_node(tree):
    """After a scene load the node's model is what Apply uses, so the combo box shows it."""
    update = ast.unparse(_method(tree, "PanelWidget", "updateGUIFromParameterNode"))
    assert "combo.itemData(combo.currentIndex) != node.modelName" in update
    assert "self._selectModelInCombo(node.modelName)" in update


def test_a_model_that_is_not_installed_is_never_swapped_silently(tree):
    """A scene saved with a model this Slicer lacks keeps asking for it: the combo box selects nothing (no
    fallback to the first model), only the user's choice in the combo box (``onModelChanged``) writes the node's
    model, Apply and the batch need the node's own model installed, and the panel says which model is missing and
    how to install it (model description, status line, Apply's tool tip)."""
    panel = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == "PanelWidget")
    writers = {method.name for method in panel.body if isinstance(method, ast.FunctionDef)
               for node in ast.walk(method) if isinstance(node, ast.Attribute) and node.attr == "modelName"
               and isinstance(node.ctx, ast.Store)}
    assert writers == {"onModelChanged"}
    select = _method(tree, "PanelWidget", "_selectModelInCombo")
    assert "max(" not in ast.unparse(select)
    assert "self.ui.modelComboBox.currentIndex = index" in ast.unparse(select)
    changed = _method(tree, "PanelWidget", "onModelChanged")
    guard = changed.body[0]
    assert isinstance(guard, ast.If) and "self._missingModelText" in _called(guard)
    assert isinstance(guard.body[-1], ast.Return)  # nothing is written for an index that is no installed model
    update = ast.unparse(_method(tree, "PanelWidget", "updateGUIFromParameterNode"))
    assert "canRun = bool(node and node.inputVolume and bundle)" in update
    assert "self.ui.batchApplyButton.enabled = not running and bool(bundle)" in update
    assert "missing or _(" in update  # Apply's tool tip says why it is off
    assert "self._missingModelText" in _called(_method(tree, "PanelWidget", "_updateDomainStatus"))
    text = ast.unparse(_method(tree, "PanelWidget", "_missingModelText"))
    assert "model=node.modelName" in text and "ATTENTION_UNET_MODELS" in text and "Refresh" in text


def test_the_input_selector_refuses_the_modules_own_maps(tree):
    changed = ast.unparse(_method(tree, "PanelWidget", "onInputChanged"))
    assert "not self.logic.isInputVolume(volume)" in changed and "setattr(node, 'inputVolume', None)" in changed


def test_user_visible_module_text_is_marked_for_translation(tree):
    """As in Slicer's template: ``_()`` (``slicer.i18n.tr``) on the title, help and acknowledgement, the category
    through ``translate("qSlicerAbstractCoreModule", ...)``."""
    init = _method(tree, "AttentionUNetSegment", "__init__")
    values = {_dotted(node.targets[0]): node.value for node in ast.walk(init) if isinstance(node, ast.Assign)}
    for name in ("self.parent.title", "self.parent.helpText", "self.parent.acknowledgementText"):
        assert isinstance(values[name], ast.Call) and _dotted(values[name].func) == "_", name
    (category,) = values["self.parent.categories"].elts
    assert _dotted(category.func) == "translate" and category.args[0].value == "qSlicerAbstractCoreModule"
    imports = {(node.module, alias.name, alias.asname) for node in ast.parse(MODULE_FILE.read_text()).body
               if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {("slicer.i18n", "tr", "_"), ("slicer.i18n", "translate", None)} <= imports


#: Calls whose first argument (or ``message=``) is shown to the user as it is, and keywords that are window titles.
MESSAGE_CALLS = {"AttentionUNetSegmentError", "slicer.util.errorDisplay", "slicer.util.warningDisplay",
                 "slicer.util.infoDisplay", "slicer.util.confirmOkCancelDisplay", "slicer.util.confirmYesNoDisplay"}
#: Widget properties the panel sets to text the user reads.
TEXT_PROPERTIES = {"text", "toolTip"}


def _unmarked_text(node: ast.AST) -> bool:
    """Whether ``node`` builds user text that Slicer's translation cannot see: a string literal with words, an
    f-string with words, a concatenation or ``%`` (a sentence in pieces, even of ``_()`` pieces), or a literal's
    ``.format``. A ``_()`` call (formatted or not) is marked; a name, attribute or other call passes on a message
    made elsewhere (``job.error``, ``str(error)`` of an engine error: the engine never imports slicer)."""
    def words(text: str) -> bool:
        return any(c.isalpha() for c in text)

    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and words(node.value)
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.Constant) and words(part.value) for part in node.values)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, (ast.Add, ast.Mod))
    if isinstance(node, ast.IfExp):
        return _unmarked_text(node.body) or _unmarked_text(node.orelse)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return isinstance(node.func.value, (ast.Constant, ast.JoinedStr))
    return False


def _user_messages(path: Path) -> Iterator[Tuple[int, ast.AST]]:
    """``(line, expression)`` of every message the file shows: the ``AttentionUNetSegmentError`` and message box
    texts, window titles, and the panel's ``.text``/``.toolTip`` assignments."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and _dotted(node.func) in MESSAGE_CALLS:
            yield from ((node.lineno, arg) for arg in node.args[:1])
            yield from ((node.lineno, kw.value) for kw in node.keywords if kw.arg in ("message", "windowTitle"))
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Attribute) and t.attr in TEXT_PROPERTIES for t in node.targets):
                yield node.lineno, node.value


def test_every_user_message_is_marked_for_translation():
    """Every message the Slicer layer raises or shows goes through ``_()``, as Slicer's own scripted modules do
    (``_("... {name} ...").format(name=...)``), so that a language pack can translate it."""
    unmarked = [f"{path.name}:{line}: {ast.unparse(message)[:100]}" for path in SLICER_FILES
                for line, message in _user_messages(path) if _unmarked_text(message)]
    assert not unmarked, "user messages not marked with _():\n" + "\n".join(unmarked)


def test_translatable_strings_are_literals_with_named_placeholders():
    """Qt's lupdate extracts only a literal: ``_()`` (``slicer.i18n.tr``) takes one string literal, never an
    f-string or a variable, ``translate()`` a literal context and text. Placeholders are named and each given by
    its ``.format`` (translators reorder them); a ``_()`` that is not formatted has none. Every file that calls
    ``_`` imports it at module scope as Slicer's template does (the context is the calling file), and none
    rebinds the name."""
    import string

    problems = []
    for path in SLICER_FILES:
        module = ast.parse(path.read_text(), filename=str(path))
        imported = any(isinstance(node, ast.ImportFrom) and node.module == "slicer.i18n"
                       and ("tr", "_") in {(a.name, a.asname) for a in node.names} for node in module.body)
        formatted = {id(node.func.value): node for node in ast.walk(module) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr == "format"}
        for node in ast.walk(module):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Name) and node.id == "_" and isinstance(node.ctx, ast.Store) or \
                    isinstance(node, ast.arg) and node.arg == "_":
                problems.append(f"{where}: '_' rebound (it is the translation function)")
            if not isinstance(node, ast.Call) or _dotted(node.func) not in ("_", "translate"):
                continue
            count = 1 if _dotted(node.func) == "_" else 2
            if node.keywords or len(node.args) != count or not all(
                    isinstance(arg, ast.Constant) and isinstance(arg.value, str) for arg in node.args):
                problems.append(f"{where}: {ast.unparse(node)[:100]} (not string literals)")
                continue
            if _dotted(node.func) == "translate":
                continue
            if not imported:
                problems.append(f"{where}: _ used without 'from slicer.i18n import tr as _' at module scope")
            fields = {name for _text, name, _spec, _conv in string.Formatter().parse(node.args[0].value)
                      if name is not None}
            call = formatted.get(id(node))
            given = {kw.arg for kw in call.keywords} if call is not None else set()
            if call is not None and call.args or "" in fields or any(f.isdigit() for f in fields) \
                    or fields != given:
                problems.append(f"{where}: placeholders {sorted(fields)} given {sorted(given)}"
                                + (" (positional)" if call is not None and call.args else ""))
    assert not problems, "\n".join(problems)


def test_extension_metadata_agrees_everywhere():
    """``AttentionUNet.s4ext`` (the design card lists it; the build regenerates it) and ``AttentionUNet.json``
    (what the ExtensionsIndex reads) say the same as CMakeLists.txt; the contributor line has Slicer's
    "Name (Organisation)" form and is the module's own."""
    entries = {}
    for line in (ROOT / "AttentionUNet.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    catalog = json.loads((ROOT / "AttentionUNet.json").read_text())
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert entries["scm"] == catalog.get("scm_type", "git")
    assert entries["scmurl"] == catalog["scm_url"] and entries["scmrevision"] == catalog["scm_revision"]
    assert entries["depends"].split() == catalog["build_dependencies"]
    assert entries["category"] == catalog["category"]
    assert entries["build_subdirectory"] == catalog["build_subdirectory"]
    assert entries["enabled"] == ("1" if catalog.get("enabled", True) else "0")
    if "tier" in catalog:
        assert entries.get("tier", str(catalog["tier"])) == str(catalog["tier"])
    # Every field both files have agrees (the build writes the .s4ext from the CMake EXTENSION_<KEY> variables), and
    # each field the build cannot take elsewhere (the scm fields come from git, enabled and build_subdirectory
    # have defaults) is set in CMakeLists.txt, so a regenerated .s4ext keeps it.
    variables = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    for key, value in entries.items():
        variable = "EXTENSION_" + key.upper()
        if key not in ("scm", "scmurl", "scmrevision", "enabled", "build_subdirectory"):
            assert variable in variables, f"{key} is in AttentionUNet.s4ext but CMakeLists.txt sets no {variable}"
        if variable == "EXTENSION_DEPENDS":  # a CMake list there, space-separated here
            assert value.split() == variables[variable].split(";"), key
        elif variable in variables:
            assert value == variables[variable], key
    contributors = variables["EXTENSION_CONTRIBUTORS"]
    assert re.fullmatch(r"[^(),]+ \([^()]+\)(, [^(),]+ \([^()]+\))*", contributors), contributors
    definitions = ast.parse((SLICER_PACKAGE / "definitions.py").read_text())
    (value,) = [ast.literal_eval(node.value) for node in definitions.body if isinstance(node, ast.Assign)
                and _dotted(node.targets[0]) == "CONTRIBUTORS"]
    assert ", ".join(value) == contributors
