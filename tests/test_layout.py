"""
The repository's layering, read from the import statements (parsed with `ast`, nothing is
imported): nanochat/ is the library that training, evaluation and chat import; scripts/ and
tasks/ use it; dev/ holds environment plumbing (the offline builders) that uses the library and
is never imported by it. Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nanochat", "scripts", "tasks", "dev")


def repo_modules():
    """{dotted module name: path} of every .py file under PACKAGES (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for folder, dirnames, filenames in os.walk(os.path.join(REPO_ROOT, package)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for filename in sorted(f for f in filenames if f.endswith(".py")):
                parts = os.path.relpath(os.path.join(folder, filename), REPO_ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(folder, filename)
    return modules


def imported_names(path, module):
    """Dotted names that the file imports (for `from a import b`: a.b, and a itself)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == "__init__.py"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                package = package[: len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph():
    """{module: sorted list of the repo modules it imports}."""
    modules = repo_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            # `from a import b` names a.b: a submodule if there is one, else an attribute of a
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        # a name like `nanochat` alone (the package, for a submodule import) adds nothing
        graph[module] = sorted(t for t in targets if not any(o.startswith(t + ".") and o in targets for o in targets))
    return graph


def find_cycle(graph):
    """One import cycle as [m1, m2, ..., m1], or None."""
    state = {}  # module -> "active" while on the DFS stack, "done" after

    def visit(module, stack):
        state[module] = "active"
        stack.append(module)
        for target in graph.get(module, ()):
            if state.get(target) == "active":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def top(module):
    return module.split(".")[0]


def test_library_scripts_and_tasks_never_import_dev():
    offenders = {m: [t for t in targets if top(t) == "dev"]
                 for m, targets in import_graph().items() if top(m) in ("nanochat", "scripts", "tasks")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_library_never_imports_scripts():
    offenders = {m: [t for t in targets if top(t) == "scripts"] for m, targets in import_graph().items() if top(m) == "nanochat"}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_there_is_no_import_cycle():
    graph = import_graph()
    assert find_cycle({m: t for m, t in graph.items() if top(m) == "nanochat"}) is None  # the library alone
    assert find_cycle(graph) is None  # and everything together


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_the_graph_sees_the_known_edges():
    graph = import_graph()
    assert "nanochat.dataset" in graph["nanochat.dataloader"]
    assert "nanochat.reference_encodings" in graph["nanochat.tokenizer"]  # a lazy import inside a method
    assert {"dev.offline_data.corpus", "dev.offline_data.tiktoken_refs"} <= set(graph["dev.offline_data.__main__"])
    assert "nanochat.dataset" in graph["dev.offline_data.corpus"]  # `from nanochat import dataset`


# Modules under scripts/ that are not run: chat_web's own helper, and the model code export_hf ships
# beside an exported model. Every other script is a runnable phase.
NOT_RUNNABLE = ("scripts.chat_web_api", "scripts.hf_export")


def test_no_runnable_script_imports_another():
    """What two scripts share belongs in the library; a script imports only the library, tasks and its own helpers."""
    def runnable(module):
        return top(module) == "scripts" and module != "scripts" and not module.startswith(NOT_RUNNABLE)

    offenders = {m: [t for t in targets if runnable(t)] for m, targets in import_graph().items() if top(m) in ("scripts", "tasks")}
    assert {m: t for m, t in offenders.items() if t} == {}
    assert "scripts.chat_web_api" in import_graph()["scripts.chat_web"]  # the helper edge is seen, and allowed
