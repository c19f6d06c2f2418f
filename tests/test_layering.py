"""The import arrows between Vantage's packages follow the table in
docs/internals.md ("Allowed imports"), and nothing else.

The table is the one source of truth: this test reads it, walks every ``.py``
file of the packages with ``ast`` (module-level and function-level imports,
absolute and relative, and ``importlib.import_module("...")`` with a literal
name) and names ``file:line`` for each arrow the table does not allow. A name
in the table's right-hand column that is not one of our packages (``click``)
is guarded too: only the packages whose row lists it may import it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "internals.md"
HEADING = "## Allowed imports"
PACKAGES = ("core", "probes", "analysis", "services", "test_lists", "lab", "cli")


@dataclass(frozen=True)
class Arrow:
    path: str    # relative to the tree walked
    line: int
    source: str  # the importing package
    target: str  # the imported top-level name

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target}"


def read_rules(doc: Path = DOC) -> dict[str, set[str]]:
    """``{package: names it may import}`` from the table under HEADING.

    A row is ``| `pkg` | `a`, `b` |``; a right-hand cell without a backticked
    name (``nothing of ours``) allows nothing."""
    text = doc.read_text(encoding="utf-8")
    start = text.find(HEADING + "\n")
    assert start >= 0, f"{doc}: no '{HEADING}' section"
    section = text[start + len(HEADING):]
    end = section.find("\n## ")
    section = section if end < 0 else section[:end]
    rules: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if len(cells) < 2:
            continue
        source = re.fullmatch(r"`(\w+)/?`", cells[0])
        if source is None:  # the header and the |---| line
            continue
        assert source[1] not in rules, f"{doc}: {source[1]} has two rows"
        rules[source[1]] = {m.rstrip("/") for m in re.findall(r"`(\w+/?)`", cells[1])}
    return rules


def guarded(rules: dict[str, set[str]]) -> set[str]:
    """Every top-level name the table speaks of: our packages and the
    third-party names it restricts."""
    return set(rules).union(*rules.values())


def _imports(tree: ast.AST, package_parts: list[str]):
    """(line, top-level name) for every import in ``tree``, wherever it is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, (node.module or "").split(".")[0]
                continue
            # Relative: ``level`` 1 is the file's own package, 2 its parent...
            base = package_parts[: len(package_parts) - (node.level - 1)] if node.level - 1 <= len(package_parts) else []
            if base:
                yield node.lineno, base[0]
            elif node.module:  # climbed to the root: ``from ..analysis import x``
                yield node.lineno, node.module.split(".")[0]
            else:  # ``from .. import analysis, lab``
                for alias in node.names:
                    yield node.lineno, alias.name
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")
              and (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                   or isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            yield node.lineno, node.args[0].value.split(".")[0]


def forbidden_arrows(root: Path, rules: dict[str, set[str]], packages=PACKAGES) -> list[Arrow]:
    """Every import under ``root/<package>/`` that the rules do not allow."""
    names = guarded(rules)
    found = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            # The file's package, e.g. ["services", "helper"] (for an
            # __init__.py too: its folder is the package ``.`` names).
            parts = list(rel.parts[:-1])
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
            for line, target in _imports(tree, parts):
                if target in names and target != package and target not in rules.get(package, set()):
                    found.append(Arrow(rel.as_posix(), line, package, target))
    return found


def test_the_table_covers_every_package_and_guards_click():
    rules = read_rules()
    assert set(rules) == set(PACKAGES), f"docs/internals.md rows {sorted(rules)} != packages {sorted(PACKAGES)}"
    # Every folder of the tree that is a Python package has a row: a new
    # package must say what it may import before it can exist.
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert on_disk <= set(rules), f"packages without a row in docs/internals.md: {sorted(on_disk - set(rules))}"
    assert rules["core"] == set(), "core imports nothing of ours"
    assert "probes" not in rules["analysis"], "analysis reads the database, never probes/"
    holders = {p for p, allowed in rules.items() if "click" in allowed}
    assert holders == {"cli"}, f"click may be imported only in cli/, the table says {sorted(holders)}"
    unknown = guarded(rules) - set(rules) - {"click"}
    assert not unknown, f"the table names {sorted(unknown)}, which are not packages of this tree"


def test_no_forbidden_import_arrow():
    arrows = forbidden_arrows(ROOT, read_rules())
    assert not arrows, "imports the table in docs/internals.md does not allow:\n" + "\n".join(map(str, arrows))


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("analysis/engine.py", "import probes.store\n", [(1, "probes")]),
        ("analysis/engine.py", "def f():\n    from probes import store\n", [(2, "probes")]),
        ("analysis/engine.py", "def f():\n    from ..cli.common import x\n", [(2, "cli")]),
        ("analysis/engine.py", "from .. import probes, core\n", [(1, "probes")]),
        ("services/helper/app.py", "from ...cli import main\n", [(1, "cli")]),
        ("services/helper/app.py", "from ..helper import limits\nfrom . import shapes\n", []),
        ("probes/geo.py", "import click\n", [(1, "click")]),
        ("lab/runner.py", "from click import echo\n", [(1, "click")]),
        ("test_lists/loader.py", "import importlib\nm = importlib.import_module('analysis.engine')\n", [(2, "analysis")]),
        ("core/net.py", "if True:\n    from probes.failures import classify\n", [(2, "probes")]),
        ("cli/run.py", "import click\nfrom lab import runner\nfrom analysis import engine\n", []),
        ("probes/http.py", "import aiohttp\nfrom core import net\nfrom . import tcp\n", []),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, path, source, expected):
    """The check itself, on a synthetic tree with the real table: it cannot
    pass by reading nothing."""
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    arrows = forbidden_arrows(tmp_path, read_rules(), packages=[path.split("/")[0]])
    assert [(a.line, a.target) for a in arrows] == expected
    assert all(str(a).startswith(f"{path}:{a.line}: ") for a in arrows)


def test_the_walk_reads_the_real_tree():
    # The walk finds the files it claims to check (an empty walk passes anything).
    counted = {p: len(list((ROOT / p).rglob("*.py"))) for p in PACKAGES}
    assert all(counted.values()), counted


def test_the_map_names_only_files_that_exist():
    # docs/internals.md is the newcomer's map: every repository path it names
    # in backticks (`probes/store.py`, `analysis/sql/`, `cli/main.py`) exists.
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:core|probes|analysis|services|test_lists|lab|cli|tests|bench|docs|scripts)/[\w./-]*)`", text))
    assert len(named) > 20, "the map names hardly any file: was it rewritten without paths?"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/internals.md names paths that do not exist: {missing}"
