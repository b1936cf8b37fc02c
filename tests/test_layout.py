"""The house: every module of moco_hf imports the others one way only (no circle, lazy imports inside functions
included), and the data package keeps its order: presets, sources and decode import nothing of moco_hf."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moco_hf"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """The moco_hf modules `path` imports anywhere in its body (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "moco_hf"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "moco_hf":
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else target)
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles():
    edges = graph()
    assert "moco_hf.data.decode" in edges and "moco_hf.views" in edges  # the walk sees the package
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_modules_import_in_one_direction():
    edges = graph()
    for base in ("moco_hf.data.presets", "moco_hf.data.sources", "moco_hf.data.decode"):
        assert edges[base] == set(), (base, edges[base])
    assert edges["moco_hf.data.transforms"] == {"moco_hf.data.presets"}
    assert edges["moco_hf.data.gpu_augment"] == {"moco_hf.data.presets"}
    # evaluation reads preprocessing, not the publishing code
    assert "moco_hf.hub" not in edges["moco_hf.evaluation"]
    assert "moco_hf.preprocessing" in edges["moco_hf.evaluation"] and "moco_hf.preprocessing" in edges["moco_hf.hub"]
    # the modeling code ships with the weights: it may import only its two siblings
    assert edges["moco_hf.modeling_moco"] <= {"moco_hf.configuration_moco", "moco_hf.backbones"}
