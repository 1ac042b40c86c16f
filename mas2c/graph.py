"""Diagrams of a spec's workflow: Mermaid (for READMEs) and Graphviz dot.

Both are built from one small graph model: nodes with labels and shapes, edges
with optional labels, and clusters for loops and parallel steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mas2c.lang.spec import Spec, Step, iter_spec_steps


@dataclass
class Graph:
    nodes: list[tuple[str, str, str]] = field(default_factory=list)  # id, label, shape
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # from, to, label
    clusters: list[tuple[str, str, list[str]]] = field(default_factory=list)  # id, label, node ids

    def node(self, node_id: str, label: str, shape: str = "box") -> str:
        self.nodes.append((node_id, label, shape))
        return node_id

    def edge(self, source: str, target: str, label: str = "") -> None:
        self.edges.append((source, target, label))


def _label(step: Step) -> str:
    detail = step.graph_detail()
    out = step.writes()
    text = f"{step.id}\n{step.kind}" + (f": {detail}" if detail else "")
    text += f"\nretry ×{step.retry}" if step.retry else ""
    return text + (f"\n→ {out}" if out else "")


def build(spec: Spec) -> Graph:
    graph = Graph()
    start = graph.node("start", "inputs: " + (", ".join(sorted(spec.inputs)) or "none"), "round")
    ends = _steps(graph, spec.workflow, [start], "")
    finish = graph.node(
        "finish", "outputs: " + (", ".join(sorted(spec.outputs)) or "none"), "round"
    )
    for end in ends:
        graph.edge(end, finish)
    _flows(graph, spec)
    _agents(graph, spec)
    return graph


def _agents(graph: Graph, spec: Spec) -> None:
    """Delegation: an edge from each step to the workers its agents call as tools
    ("delegates"), and to each agent a state value may choose ("chooses")."""
    drawn: set[str] = set()

    def agent_node(agent_id: str) -> str:
        node_id = "a_" + "".join(c if c.isalnum() else "_" for c in agent_id)
        if node_id not in drawn:
            drawn.add(node_id)
            agent = spec.agents.get(agent_id)
            graph.node(node_id, f"agent {agent_id}" + (f"\n{agent.role}" if agent else ""), "round")
        return node_id

    for _pointer, step in iter_spec_steps(spec):
        step_node = "s_" + step.id.replace("-", "_")
        choice = step.agent_choice()
        for candidate in choice[2] if choice else []:
            graph.edge(step_node, agent_node(candidate), "chooses")
        for ref in step.agent_refs():
            agent = spec.agents.get(ref.agent)
            for worker in (agent.delegates or []) if agent is not None else []:
                graph.edge(step_node, agent_node(worker), "delegates")


def _flows(graph: Graph, spec: Spec) -> None:
    """Each flow as a cluster of its own (inputs -> steps -> outputs), and an edge from
    every step that runs it (labelled with how many times)."""
    entries = {}
    for name, flow in spec.flows.items():
        key = "f_" + "".join(c if c.isalnum() else "_" for c in name)
        before = len(graph.nodes)
        clustered = {n for _, _, members in graph.clusters for n in members}
        start = graph.node(
            key + "_in", "inputs: " + (", ".join(sorted(flow.inputs)) or "none"), "round"
        )
        ends = _steps(graph, flow.steps, [start], "")
        finish = graph.node(key + "_out", "outputs: " + ", ".join(sorted(flow.outputs)), "round")
        for end in ends:
            graph.edge(end, finish)
        inner = {n for _, _, members in graph.clusters for n in members} - clustered
        members = [n[0] for n in graph.nodes[before:] if n[0] not in inner]
        graph.clusters.append((key, f"flow {name}", members))
        entries[name] = start
    for _pointer, step in iter_spec_steps(spec):
        for _key, name in step.flow_refs():
            if name in entries:
                times = step.flow_repeats()
                label = f"runs {times}×" if times > 1 else "runs"
                graph.edge("s_" + step.id.replace("-", "_"), entries[name], label)


def _steps(graph: Graph, steps: list[Step], entries: list[str], label: str) -> list[str]:
    """Adds `steps` after `entries`; returns the nodes the next step follows."""
    for step in steps:
        entries = _step(graph, step, entries, label)
        label = ""
    return entries


def _step(graph: Graph, step: Step, entries: list[str], label: str) -> list[str]:
    """Draws a step, then its `fallback` steps on an edge "on failure" from it."""
    exits = _shaped(graph, step, entries, label)
    if not step.fallback:
        return exits
    return exits + _steps(graph, step.fallback, ["s_" + step.id.replace("-", "_")], "on failure")


def _shaped(graph: Graph, step: Step, entries: list[str], label: str) -> list[str]:
    """Draws a step by how its nested step lists run (its `shape`), never by its kind."""
    node_id = "s_" + step.id.replace("-", "_")
    children = [steps for _key, steps in step.child_lists()]
    if step.shape == "concurrent":
        fork = graph.node(node_id, f"{step.id}\n{step.kind}", "fork")
        for entry in entries:
            graph.edge(entry, fork, label)
        exits: list[str] = []
        for branch in children:
            exits += _steps(graph, branch, [fork], "")
        out = step.writes()
        join = graph.node(node_id + "_join", "join" + (f"\n→ {out}" if out else ""), "fork")
        for end in exits:
            graph.edge(end, join)
        return [join]
    if step.shape == "repeat":
        fan = step.fan_out()
        bound = f" ≤ {getattr(step, fan.field)}" if fan is not None else ""
        head = graph.node(node_id, f"{step.id}\n{step.kind}{bound}", "loop")
        for entry in entries:
            graph.edge(entry, head, label)
        before = len(graph.nodes)
        exits = [head]
        for body in children:
            exits = _steps(graph, body, exits, "")
        graph.clusters.append(
            (node_id + "_c", f"{step.kind} {step.id}", [n[0] for n in graph.nodes[before:]])
        )
        until = " and ".join(text for _key, text in step.conditions())
        check = graph.node(node_id + "_until", f"until {until}", "decision")
        for end in exits:
            graph.edge(end, check)
        graph.edge(check, head, "no")
        return [check]
    if step.shape == "each":
        return _each(graph, step, node_id, children, entries, label)
    if step.shape == "alternatives":
        decision = graph.node(node_id, f"{step.id}\n{step.kind}", "decision")
        for entry in entries:
            graph.edge(entry, decision, label)
        exits = []
        whens = [text for _key, text in step.conditions()]
        for index, arm in enumerate(children):
            exits += _steps(graph, arm, [decision], whens[index] if index < len(whens) else "else")
        if len(children) <= len(whens):  # no default arm: the decision itself falls through
            exits += [decision]
        return exits
    graph.node(node_id, _label(step))
    for entry in entries:
        graph.edge(entry, node_id, label)
    if children:  # a "sequence" kind: its nested steps follow it
        return _steps(graph, [s for steps in children for s in steps], [node_id], "")
    return [node_id]


def _each(
    graph: Graph,
    step: Step,
    node_id: str,
    children: list[list[Step]],
    entries: list[str],
    label: str,
) -> list[str]:
    """A body run once per item (`map`): a fork for the items, the body in a cluster, a
    join that collects the results."""
    fork = graph.node(node_id, f"{step.id}\n{step.kind}: {step.graph_detail()}", "fork")
    for entry in entries:
        graph.edge(entry, fork, label)
    before = len(graph.nodes)
    exits = [fork]
    for body in children:
        exits = _steps(graph, body, exits, "each item" if exits == [fork] else "")
    fan = step.fan_out()
    bound = f" (≤ {fan.value} items)" if fan is not None else ""
    graph.clusters.append(
        (node_id + "_c", f"{step.kind} {step.id}{bound}", [n[0] for n in graph.nodes[before:]])
    )
    out = step.writes()
    join = graph.node(node_id + "_join", "results in order" + (f"\n→ {out}" if out else ""), "fork")
    for end in exits:
        graph.edge(end, join)
    return [join]


_MERMAID_SHAPES = {
    "box": ('["', '"]'),
    "round": ('(["', '"])'),
    "fork": ('[/"', '"/]'),
    "loop": ('[["', '"]]'),
    "decision": ('{"', '"}'),
}


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("\n", "<br/>")


def mermaid(spec: Spec) -> str:
    graph = build(spec)
    lines = ["flowchart TD"]
    clustered = {n for _, _, members in graph.clusters for n in members}
    for node_id, label, shape in graph.nodes:
        if node_id not in clustered:
            left, right = _MERMAID_SHAPES[shape]
            lines.append(f"    {node_id}{left}{_mermaid_text(label)}{right}")
    by_id = {n[0]: n for n in graph.nodes}
    for cluster_id, cluster_label, members in graph.clusters:
        lines.append(f'    subgraph {cluster_id}["{_mermaid_text(cluster_label)}"]')
        for member in members:
            _, label, shape = by_id[member]
            left, right = _MERMAID_SHAPES[shape]
            lines.append(f"        {member}{left}{_mermaid_text(label)}{right}")
        lines.append("    end")
    for source, target, label in graph.edges:
        arrow = f' -->|"{_mermaid_text(label)}"| ' if label else " --> "
        lines.append(f"    {source}{arrow}{target}")
    return "\n".join(lines) + "\n"


_DOT_SHAPES = {
    "box": "box",
    "round": "oval",
    "fork": "parallelogram",
    "loop": "box3d",
    "decision": "diamond",
}


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def dot(spec: Spec) -> str:
    graph = build(spec)
    lines = [
        f'digraph "{_dot_text(spec.name)}" {{',
        "    rankdir=TB;",
        '    node [fontname="Helvetica"];',
    ]
    clustered = {n for _, _, members in graph.clusters for n in members}
    by_id = {n[0]: n for n in graph.nodes}

    def node_line(node_id: str, indent: str) -> str:
        _, label, shape = by_id[node_id]
        return f'{indent}{node_id} [label="{_dot_text(label)}", shape={_DOT_SHAPES[shape]}];'

    for node_id, _, _ in graph.nodes:
        if node_id not in clustered:
            lines.append(node_line(node_id, "    "))
    for cluster_id, cluster_label, members in graph.clusters:
        lines.append(f'    subgraph cluster_{cluster_id} {{ label="{_dot_text(cluster_label)}";')
        lines += [node_line(member, "        ") for member in members]
        lines.append("    }")
    for source, target, label in graph.edges:
        suffix = f' [label="{_dot_text(label)}"]' if label else ""
        lines.append(f"    {source} -> {target}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"
