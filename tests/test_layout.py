"""The package's shape: no import cycles among whaleid modules, subpackages that depend on each other
one way only, no oversized module, and the light commands do not load TensorFlow."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "whaleid"
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


def module_imports() -> dict[str, set[str]]:
    """whaleid module -> the whaleid modules it imports (at any depth of its code)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        deps = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod.startswith("whaleid"):
                    deps.add(mod)
                    deps.update(f"{mod}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("whaleid"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def runtime_nodes(tree):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_whaleid_modules():
    graph = module_imports()
    assert "whaleid.pipeline.stage" in graph and graph["whaleid.cli"], "the import graph was not read"
    assert find_cycle(graph) is None


# Each subpackage may import only from those before it (cli.py, at the top, imports anything): a
# reader finds where a change goes from the folder names, and lower layers never reach up.
LAYERS = ["data", "pipeline", "metrics", "backbones", "preprocess", "similarity", "learning", "report", "inference"]
SIDE = {"datasets": {"pipeline", "data", "preprocess"}}  # data sets: not on the path of a stage


def subpackage(module: str) -> str | None:
    """whaleid.learning.heads.base -> learning; whaleid.cli (top level) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else None


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for m, deps in graph.items():
        a = subpackage(m)
        for d in deps:
            b = subpackage(d)
            if a is None or b is None or a == b:
                continue
            ok = (b in SIDE.get(a, ())) or (a in LAYERS and b in LAYERS and LAYERS.index(b) < LAYERS.index(a))
            if not ok:
                bad.append((m, d))
    return sorted(bad)


def test_layer_check_finds_an_upward_import():
    graph = {"whaleid.pipeline.stage": {"whaleid.learning.train"}, "whaleid.learning.train": {"whaleid.pipeline.stage"},
             "whaleid.datasets.synth": {"whaleid.inference.embedding"}, "whaleid.cli": {"whaleid.report.page"}}
    assert layer_violations(graph) == [("whaleid.datasets.synth", "whaleid.inference.embedding"),
                                       ("whaleid.pipeline.stage", "whaleid.learning.train")]


def test_subpackages_depend_one_way():
    graph = module_imports()
    packages = {subpackage(m) for m in graph} - {None}
    assert packages <= set(LAYERS) | set(SIDE), f"a subpackage without a layer: {packages - set(LAYERS) - set(SIDE)}"
    assert layer_violations(graph) == []
    between = {}
    for m, deps in graph.items():
        if subpackage(m):
            between.setdefault(subpackage(m), set()).update(
                b for d in deps if (b := subpackage(d)) and b != subpackage(m))
    assert find_cycle({p: between.get(p, set()) & packages for p in packages}) is None


def test_dotted_run_paths_name_real_functions():
    """Stage and head paths are strings (imported when used): each must name a module and attribute."""
    import importlib.util
    from whaleid.stages import identify_stages
    from whaleid.pipeline.head_names import REGISTRY
    every, _ = identify_stages("batch", Path("photos"))
    for path in [s.run for s in every] + list(REGISTRY.values()):
        module, attr = path.split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None, path
        assert f"def {attr}" in Path(spec.origin).read_text() or f"class {attr}" in Path(spec.origin).read_text(), path


def test_no_module_over_the_size_limit():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def test_status_does_not_import_tensorflow(tmp_path):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom whaleid.cli import main\n"
            f"r = CliRunner().invoke(main, ['status', '--work', {str(tmp_path)!r}])\n"
            "print(r.output)\nassert r.exit_code == 0, r.output\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'cv2') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dedup" in out.stdout and "predict" in out.stdout


def long_functions(limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """module:function -> lines, for every function (or method) of whaleid/ longer than `limit`."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = n
    return out


def test_long_function_finder_counts_lines():
    assert long_functions(limit=100000) == {}
    assert "whaleid/learning/train.py:read_inputs" in long_functions(limit=5)


def test_no_function_over_the_size_limit():
    """A reader sees a whole function on one screen: the ranking path and the training loop too."""
    assert long_functions() == {}


CODE_MD = ROOT / "docs" / "code.md"


def documented(text: str) -> tuple[list[str], set[str]]:
    """(packages of the table, in order; module paths named in backticks) of docs/code.md's text."""
    import re
    packages = re.findall(r"^\| `([a-z_]+)/` \|", text, flags=re.M)
    named = re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", text)
    modules = {m.removeprefix("whaleid/") for m in named if not m.startswith(("tests/", "scripts/"))}
    return packages, modules


def test_docs_code_finder_reads_a_planted_page():
    packages, modules = documented("| `data/` | x | y |\n| `pipeline/` | x | y |\n- `data/images.py`: a\n- `cli.py`, `x/y/z.py`; `whaleid/stages.py`, `tests/test_a.py`")
    assert packages == ["data", "pipeline"] and modules == {"data/images.py", "cli.py", "x/y/z.py", "stages.py"}


def test_docs_code_lists_every_package_and_module_in_layer_order():
    """docs/code.md is where a reader finds where a change goes: it must match the tree."""
    packages, modules = documented(CODE_MD.read_text())
    assert packages == LAYERS + sorted(SIDE), packages
    actual = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert actual - modules == set(), f"modules missing from docs/code.md: {sorted(actual - modules)}"
    assert modules - actual == set(), f"docs/code.md names modules that do not exist: {sorted(modules - actual)}"
