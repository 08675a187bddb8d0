"""The import graph has no cycles, so every module can be read (and changed) after the
modules it uses. `lint-imports` (scripts/test) checks which packages may import which;
this checks that nothing, inside a package or across, imports its way back to itself."""

from __future__ import annotations

import grimp

PACKAGES = ("hub_service", "trainer_service", "kernelhub_bench", "dashboard_service")


def cycles(graph: grimp.ImportGraph) -> set[tuple[str, str]]:
    """Each pair of modules where one imports the other and the other leads back to it."""
    found: set[tuple[str, str]] = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                found.add((module, imported))
    return found


def test_no_module_imports_its_way_back_to_itself() -> None:
    graph = grimp.build_graph(*PACKAGES)
    assert cycles(graph) == set(), "import cycles (A imports B, and B leads back to A)"


def test_the_check_sees_a_cycle() -> None:
    """The check above can fail: a graph with one cycle is reported."""
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert ("pkg.a", "pkg.b") in cycles(graph)
