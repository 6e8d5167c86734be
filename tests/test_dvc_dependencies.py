"""dvc.yaml declares exactly what each stage reads: every project module its script imports
(transitively, lazy imports included) and every params key it uses.

Derived from the code, not listed by hand: the imports from the modules' syntax trees,
the params from the attribute chains on the object ``load_params`` returns in the stage
script (``params.train`` is the whole section, ``params.encode.out_dir`` one key). A
params key used for a path through dvc.yaml templating (``${encode.out_dir}``) counts as
declared: a change to it changes the stage's definition, so DVC re-runs the stage.

Every pipeline is checked: the root dvc.yaml and each recipe's (``recipes/NAME/dvc.yaml``, a
DVC project of its own whose stages ``cd ../..`` to run from the repository root with the
recipe's ``--params`` file, and whose paths DVC reads relative to the recipe's folder).
"""

from __future__ import annotations

import ast
import os
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


def dvc_files(root: Path) -> list[Path]:
    """Every pipeline of the project: the root dvc.yaml and each recipe's (a DVC project of
    its own in recipes/NAME/)."""
    return [root / "dvc.yaml", *sorted(root.glob("recipes/*/dvc.yaml"))]


def stage_definitions(root: Path, dvc_file: Path) -> dict[str, tuple[Path, dict]]:
    """Every stage of ``dvc_file`` (a matrix expanded, one per item) with its script and raw
    definition."""
    raw = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
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


def run_dir(dvc_file: Path, definition: dict) -> Path:
    """Where the stage script runs: the dvc.yaml's folder, or where its command cd's first."""
    m = re.match(r"cd (\S+) && ", definition["cmd"])
    return Path(os.path.normpath(dvc_file.parent / m.group(1))) if m else dvc_file.parent


def loaded_params(dvc_file: Path, definition: dict) -> Path:
    """The params file the stage script loads: its --params argument, else params.yaml, where
    it runs."""
    m = re.search(r"--params\s+(\S+)", definition["cmd"])
    return Path(os.path.normpath(run_dir(dvc_file, definition) / (m.group(1) if m else "params.yaml")))


def resolve(text: str, params: dict) -> str:
    def value(m: re.Match) -> str:
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return TEMPLATE.sub(value, text)


def declared_deps(root: Path, dvc_file: Path, definition: dict, params: dict) -> set[str]:
    """The stage's deps as repository-relative paths (DVC reads them relative to the dvc.yaml)."""
    return {Path(os.path.relpath(os.path.normpath(dvc_file.parent / resolve(d, params)), root)).as_posix()
            for d in definition.get("deps", [])}


def listed_params(dvc_file: Path, definition: dict) -> dict[Path, set[str]]:
    """The keys the stage's ``params:`` lists, per params file (a bare key is one of the
    params.yaml next to the dvc.yaml, a mapping names its file relative to it)."""
    listed: dict[Path, set[str]] = {}
    for entry in definition.get("params", []):
        files = {"params.yaml": [entry]} if isinstance(entry, str) else entry
        for file, keys in files.items():
            listed.setdefault(Path(os.path.normpath(dvc_file.parent / file)), set()).update(keys)
    return listed


def problems(root: Path) -> list[str]:
    """Each missing or superfluous dependency of each stage of every pipeline, as a readable line."""
    found = []
    for dvc_file in dvc_files(root):
        # ${...} resolves against the params.yaml next to the dvc.yaml (DVC's default vars).
        vars_file = dvc_file.parent / "params.yaml"
        params = yaml.safe_load(vars_file.read_text(encoding="utf-8"))
        where = dvc_file.parent.relative_to(root).as_posix()
        for name, (script, definition) in stage_definitions(root, dvc_file).items():
            name = name if where == "." else f"{where}:{name}"
            if run_dir(dvc_file, definition) != root:
                found.append(f"{name}: runs outside the repository root, where `python -m stages...` works")
                continue
            if loaded_params(dvc_file, definition) != vars_file:
                found.append(f"{name}: loads {loaded_params(dvc_file, definition)}, not {vars_file}")
                continue
            deps = declared_deps(root, dvc_file, definition, params)
            code = transitive_sources(root, script)
            listed_code = {d for d in deps if d.endswith(".py")}
            found += [f"{name}: imports {p} but dvc.yaml does not list it" for p in sorted(code - listed_code)]
            found += [f"{name}: lists {p} but does not import it" for p in sorted(listed_code - code)]
            listed = listed_params(dvc_file, definition)
            found += [f"{name}: lists params of {f}, which its script does not load"
                      for f in sorted(set(listed) - {vars_file})]
            reads = params_reads(script)
            declared = listed.get(vars_file, set()) | set(TEMPLATE.findall(yaml.safe_dump(definition)))
            found += [f"{name}: reads params '{r}' but dvc.yaml does not declare it"
                      for r in sorted(reads) if not covered(r, declared)]
            found += [f"{name}: declares params '{p}' but never reads it"
                      for p in sorted(listed.get(vars_file, set()))
                      if not any(r == p or r.startswith(p + ".") or p.startswith(r + ".") for r in reads)]
    return found


def test_every_stage_declares_what_it_imports_and_reads() -> None:
    assert problems(REPO) == []


def test_every_pipeline_is_checked() -> None:
    assert [p.relative_to(REPO).as_posix() for p in dvc_files(REPO)] == [
        "dvc.yaml", "recipes/arithmetic/dvc.yaml"]


def test_removing_a_dependency_is_caught(tmp_path: Path) -> None:
    for name in ("pipeline", "chargen", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "recipes/arithmetic/params.yaml", "recipes/arithmetic/dvc.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    text = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(text.replace("      - chargen/tokenizers/char.py\n", "", 1))
    assert any("imports chargen/tokenizers/char.py" in p for p in problems(tmp_path))
    (tmp_path / "dvc.yaml").write_text(text.replace("      - model\n", "", 1))
    assert any("reads params 'model'" in p for p in problems(tmp_path))
    (tmp_path / "dvc.yaml").write_text(text)
    assert problems(tmp_path) == []

    recipe = tmp_path / "recipes" / "arithmetic" / "dvc.yaml"
    recipe_text = recipe.read_text(encoding="utf-8")
    edits = {  # an edit of the recipe's dvc.yaml -> the problem it must raise
        ("      - ../../pipeline/model.py\n", ""): "recipes/arithmetic:encode: imports pipeline/model.py",
        ("      - model\n", ""): "recipes/arithmetic:train: reads params 'model'",
        ("      - ../../pipeline/model.py\n", "      - pipeline/model.py\n"):
            "recipes/arithmetic:encode: imports pipeline/model.py",
        ("cmd: cd ../.. && python -m stages.download", "cmd: python -m stages.download"):
            "recipes/arithmetic:download: runs outside the repository root",
        ("stages.train --params recipes/arithmetic/params.yaml", "stages.train"):
            "recipes/arithmetic:train: loads",
        ("      - quantize\n", "      - ../../params.yaml: [quantize]\n"):
            "recipes/arithmetic:quantize: lists params of",
    }
    for (old, new), problem in edits.items():
        assert old in recipe_text, old
        recipe.write_text(recipe_text.replace(old, new, 1))
        assert any(p.startswith(problem) for p in problems(tmp_path)), (old, problems(tmp_path))


def test_each_stage_script_runs_as_a_module() -> None:
    for dvc_file in dvc_files(REPO):
        for name, (script, definition) in stage_definitions(REPO, dvc_file).items():
            assert script is not None and script.parent.name == "stages", name
            assert re.fullmatch(rf"(cd \.\./\.\. && )?python -m stages\.{script.stem}\b.*", definition["cmd"]), name
