"""The pipeline as a Mermaid flowchart, read from dvc.yaml through DVC itself.

Stages and the files that flow between them: each stage with the params sections it reads,
an arrow from every output to the stages that depend on it (labelled with the part read,
when a stage reads only part of an output folder). The project modules every stage also
depends on would swamp the picture; they are left out.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.diagrams.markdown import Diagram

CAPTION = (
    "Stages (blue, with the `params.yaml` sections each reads) and the files they write "
    "(yellow: metrics and plots). Every stage also depends on the project modules its script "
    "imports; they are left out."
)
STYLES = (
    "classDef stage fill:#dbeafe,stroke:#1d4ed8,color:#0f172a,font-weight:bold",
    "classDef data fill:#f8fafc,stroke:#64748b,color:#0f172a",
    "classDef metric fill:#fef9c3,stroke:#a16207,color:#0f172a",
)


def _inside(path: str, folder: str) -> str | None:
    """``path`` relative to ``folder`` ("" for the folder itself), or None when outside it."""
    if path == folder:
        return ""
    return path[len(folder) + 1 :] if path.startswith(folder + "/") else None


def pipeline_diagram(root: str | Path = ".") -> Diagram:
    """The DVC pipeline of ``root`` (a DVC project)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        nodes = [f'    s{i}(["{_stage_label(s)}"]):::stage' for i, s in enumerate(stages)]
        outs: dict[str, str] = {}  # path -> node id, in the order the stages write them
        edges = []
        for i, s in enumerate(stages):
            for o in s.outs:
                node = outs.setdefault(o.def_path, f"a{len(outs)}")
                kind = "metric" if o.metric or o.plot else "data"
                nodes.append(f'    {node}["{o.def_path}"]:::{kind}')
                edges.append(f"    s{i} --> {node}")
        for i, s in enumerate(stages):
            for d in s.deps:
                if isinstance(d, ParamsDependency) or d.def_path.endswith(".py"):
                    continue
                edges.append(_dep_edge(d.def_path, outs, f"s{i}", nodes))
    mermaid = "\n".join(["flowchart TD", *nodes, *edges, *(f"    {s}" for s in STYLES)]) + "\n"
    return Diagram("pipeline", mermaid, CAPTION)


def _stage_label(stage) -> str:
    """The stage's name and the params it reads."""
    from dvc.dependency.param import ParamsDependency

    params = [p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params]
    return f"{stage.name}<br/>params: {', '.join(params)}" if params else stage.name


def _dep_edge(path: str, outs: dict[str, str], stage: str, nodes: list[str]) -> str:
    """The arrow into ``stage`` from the output holding ``path`` (a new input node if none)."""
    for folder, node in outs.items():
        part = _inside(path, folder)
        if part == "":
            return f"    {node} --> {stage}"
        if part is not None:
            return f'    {node} -- "{part}" --> {stage}'
    node = outs.setdefault(path, f"a{len(outs)}")
    nodes.append(f'    {node}["{path}"]:::data')
    return f"    {node} --> {stage}"
