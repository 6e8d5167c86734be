"""dvc.yaml declares exactly what each stage reads: every project module its script imports
(transitively, lazy imports included) and every params key it uses.

Derived from the code, not listed by hand: the imports from the modules' syntax trees,
the params from the attribute chains on the object ``load_params`` returns in the stage
script (``params.train`` is the whole section, ``params.encode.out_dir`` one key). A
params key used for a path through dvc.yaml templating (``${encode.out_dir}``) counts as
declared: a change to it changes the stage's definition, so DVC re-runs the stage.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "chargen", "stages")
TEMPLATE = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}")


# --------------------------------------------------------------------------- imports


def module_file(root: Path, name: str) -> Path | None:
    """The file of module ``name`` under ``root``, or None when it is not a module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (lazy imports too), except
    under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PROJECT_PACKAGES)
    return found


def has_code(path: Path) -> bool:
    """True unless the file holds at most a docstring (an empty package marker)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def transitive_sources(root: Path, script: Path) -> set[str]:
    """Repo-relative paths of the script and every project file it imports, transitively."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            # importing a.b.c runs the package files a/__init__.py and a/b/__init__.py too
            for i in range(1, len(parts) + 1):
                file = module_file(root, ".".join(parts[:i]))
                if file is not None:
                    todo.append(file)
    return {p.relative_to(root).as_posix() for p in seen if p.name != "__init__.py" or has_code(p)}


# --------------------------------------------------------------------------- params


def params_reads(script: Path) -> set[str]:
    """Params keys the script reads: 'section' for a whole section, 'section.key' for one key."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    holders = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", None) == "load_params"
        for target in node.targets if isinstance(target, ast.Name)
    }
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id in holders and isinstance(node.ctx, ast.Load)):
            continue
        chain, cur = [], node
        while isinstance(parents.get(cur), ast.Attribute) and len(chain) < 2:
            cur = parents[cur]
            chain.append(cur.attr)
        assert chain, f"{script.name} passes the whole params object on; pass the sections it reads"
        reads.add(".".join(chain))
    return reads


def covered(read: str, declared: set[str]) -> bool:
    section = read.split(".")[0]
    return read in declared or section in declared


# --------------------------------------------------------------------------- dvc.yaml


def stage_definitions(root: Path) -> dict[str, tuple[Path, dict]]:
    """Every stage (a matrix expanded, one per item) with its script and raw definition."""
    raw = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    stages = {}
    for name, stage in raw.items():
        items = [{}]
        if "matrix" in stage:
            (key, values), = stage["matrix"].items()
            items = [{key: v} for v in values]
        for item in items:
            text = yaml.safe_dump({k: v for k, v in stage.items() if k != "matrix"})
            for key, value in item.items():
                text = text.replace(f"${{item.{key}}}", str(value))
            definition = yaml.safe_load(text)
            module = re.search(r"python -m (stages\.\w+)", definition["cmd"]).group(1)
            suffix = f"@{next(iter(item.values()))}" if item else ""
            stages[name + suffix] = (module_file(root, module), definition)
    return stages


def resolve(text: str, params: dict) -> str:
    def value(m: re.Match) -> str:
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return TEMPLATE.sub(value, text)


def declared_deps(definition: dict, params: dict) -> set[str]:
    return {resolve(d, params) for d in definition.get("deps", [])}


def declared_params(definition: dict) -> set[str]:
    listed = {p for p in definition.get("params", []) if isinstance(p, str)}
    templated = set(TEMPLATE.findall(yaml.safe_dump(definition)))
    return listed | templated


def problems(root: Path) -> list[str]:
    """Each missing or superfluous dependency of each stage, as a readable line."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    found = []
    for name, (script, definition) in stage_definitions(root).items():
        deps = declared_deps(definition, params)
        code = transitive_sources(root, script)
        listed_code = {d for d in deps if d.endswith(".py")}
        found += [f"{name}: imports {p} but dvc.yaml does not list it" for p in sorted(code - listed_code)]
        found += [f"{name}: lists {p} but does not import it" for p in sorted(listed_code - code)]
        reads, declared = params_reads(script), declared_params(definition)
        found += [f"{name}: reads params '{r}' but dvc.yaml does not declare it"
                  for r in sorted(reads) if not covered(r, declared)]
        listed = {p for p in definition.get("params", []) if isinstance(p, str)}
        found += [f"{name}: declares params '{p}' but never reads it"
                  for p in sorted(listed) if not any(r == p or r.startswith(p + ".") or p.startswith(r + ".")
                                                     for r in reads)]
    return found


def test_every_stage_declares_what_it_imports_and_reads() -> None:
    assert problems(REPO) == []


def test_removing_a_dependency_is_caught(tmp_path: Path) -> None:
    for name in ("pipeline", "chargen", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    text = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(text.replace("      - chargen/tokenizers/char.py\n", "", 1))
    assert any("imports chargen/tokenizers/char.py" in p for p in problems(tmp_path))
    (tmp_path / "dvc.yaml").write_text(text.replace("      - model\n", "", 1))
    assert any("reads params 'model'" in p for p in problems(tmp_path))


def test_each_stage_script_runs_as_a_module() -> None:
    for name, (script, definition) in stage_definitions(REPO).items():
        assert script is not None and script.parent.name == "stages", name
        assert definition["cmd"].startswith(f"python -m stages.{script.stem}"), name
