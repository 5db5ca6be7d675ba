"""Keep the deliberate copies between single-file modules equal to their sources.

The files in ``diffusers_speedup/models/``, ``diffusers_speedup/schedulers/`` and ``pipelines/`` each ship alone, so
they repeat a few pieces of each other. Every repeated piece is marked, as diffusers does, by a comment on the line
right before the function, class or assignment that repeats it::

    # Copied from diffusers_speedup.models.uvit._broadcast_timestep
    # Copied from diffusers_speedup.models.uvit.UViTAttention with UViT->DiT
    # Copied from diffusers_speedup.models.uvit._check_transformer_config with UViT->DiT, U-ViT->DiT

The dotted path names the source: a module, then a function, class, method (``Class.method``) or module-level
assignment in it. ``with A->B, C->D`` lists text replacements, applied to the source in that order. A copy is equal
to its source when its text (from its first decorator to its last line, dedented) is the source's text with the
replacements made.

Check every marker (exit status 1 and one line per problem if any copy drifted or names a missing source)::

    python tests/check_copies.py

Rewrite every drifted copy from its source (the usual fix after editing a source)::

    python tests/check_copies.py --fix

``tests/test_copies.py`` runs the check with the test suite.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The folders whose files are scanned for markers: the library and the pipelines it ships.
SCANNED_FOLDERS = ("diffusers_speedup", "pipelines")

MARKER = re.compile(r"^(?P<indent>[ \t]*)# Copied from (?P<source>[\w.]+)(?: with (?P<replacements>.+?))?[ \t]*$")
# The statements a marker may stand above.
_MARKABLE = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)


class CopyError(Exception):
    """A marker that cannot be checked: a malformed marker, a missing source, or no copy below it."""


@dataclass(frozen=True)
class Marker:
    """One ``# Copied from`` comment: where it is, what it names and the replacements it asks for."""

    path: Path
    line: int  # 1-based line of the comment; the copy starts on the next line
    text: str
    source: str
    replacements: tuple[tuple[str, str], ...]

    def where(self) -> str:
        shown = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{shown}:{self.line}: '{self.text}'"


@dataclass(frozen=True)
class Drift:
    """A marked copy whose text is not its source's: the first lines that differ, and the text it should have."""

    marker: Marker
    expected_line: str | None  # None: the copy is longer than the source
    found_line: str | None  # None: the copy is shorter than the source
    first_difference: int  # 1-based line, in the copy's file, of the first line that differs
    copy_start: int  # 1-based lines of the copy in its file
    copy_end: int
    expected: str  # the source's text with the replacements made, dedented

    def message(self) -> str:
        return (
            f"{self.marker.where()}: the copy differs from its source from line {self.first_difference} on: "
            f"expected {self.expected_line!r}, found {self.found_line!r} (rewrite it from the source with "
            "`python tests/check_copies.py --fix`)"
        )


def find_markers(path: Path) -> list[Marker]:
    """Every ``# Copied from`` marker of a file, in line order."""
    markers = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = MARKER.match(line)
        if match is None:
            if line.lstrip().startswith("# Copied from"):
                raise CopyError(
                    f"{path}:{number}: malformed marker {line.strip()!r}; the form is "
                    "'# Copied from package.module.Name[ with A->B[, C->D]]'"
                )
            continue
        markers.append(
            Marker(
                path=path,
                line=number,
                text=line.strip(),
                source=match["source"],
                replacements=_parse_replacements(match["replacements"], path, number),
            )
        )
    return markers


def _parse_replacements(text: str | None, path: Path, line: int) -> tuple[tuple[str, str], ...]:
    if text is None:
        return ()
    pairs = []
    for item in text.split(","):
        old, arrow, new = item.strip().partition("->")
        if not arrow or not old or not new:
            raise CopyError(f"{path}:{line}: replacement {item.strip()!r} is not of the form 'Old->New'")
        pairs.append((old, new))
    return tuple(pairs)


def source_text(dotted: str) -> str:
    """The text of the function, class, method or assignment a dotted path names, dedented.

    The module is found as Python finds it (importing its parent packages) and read with `ast`, without running it.
    """
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:split])
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError as error:
            # A prefix that is not a module (find_spec looks for it inside a plain module, or in a missing package)
            # means "try a shorter one"; any other missing module is a real import failure and propagates.
            if error.name is None or not f"{dotted}.".startswith(f"{error.name}."):
                raise
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        path = Path(spec.origin)
        node = _find_definition(ast.parse(path.read_text()), parts[split:])
        if node is None:
            raise CopyError(f"{dotted} does not exist: {module} ({path}) has no {'.'.join(parts[split:])}")
        return _node_text(path.read_text().splitlines(), node)
    raise CopyError(f"{dotted} does not exist: no prefix of it is a Python module")


def _find_definition(tree: ast.Module, names: list[str]):
    scope, node = tree, None
    for name in names:
        node = next((child for child in getattr(scope, "body", []) if name in _defined_names(child)), None)
        if node is None:
            return None
        scope = node
    return node


def _defined_names(node) -> tuple[str, ...]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return (node.name,)
    if isinstance(node, ast.Assign):
        return tuple(target.id for target in node.targets if isinstance(target, ast.Name))
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return (node.target.id,)
    return ()


def _first_line(node) -> int:
    return min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])


def _node_text(lines: list[str], node) -> str:
    return textwrap.dedent("\n".join(lines[_first_line(node) - 1 : node.end_lineno]))


def _marked_node(tree: ast.Module, marker: Marker):
    for node in ast.walk(tree):
        if isinstance(node, _MARKABLE) and _first_line(node) == marker.line + 1:
            return node
    raise CopyError(f"{marker.where()}: the next line does not start a function, class or assignment")


def expected_text(marker: Marker) -> str:
    """The source's text with the marker's replacements made: what the copy must be, dedented."""
    text = source_text(marker.source)
    for old, new in marker.replacements:
        text = text.replace(old, new)
    return text


def check_file(path: Path) -> list[Drift]:
    """The drifted copies of one file. Raises CopyError for a marker that cannot be checked."""
    markers = find_markers(path)
    if not markers:
        return []
    text = path.read_text()
    lines, tree = text.splitlines(), ast.parse(text)
    drifts = []
    for marker in markers:
        try:
            expected = expected_text(marker)
        except CopyError as error:
            raise CopyError(f"{marker.where()}: {error}") from None
        node = _marked_node(tree, marker)
        found = _node_text(lines, node)
        if found == expected:
            continue
        expected_lines, found_lines = expected.splitlines(), found.splitlines()
        first = next(
            (i for i, pair in enumerate(zip(expected_lines, found_lines)) if pair[0] != pair[1]),
            min(len(expected_lines), len(found_lines)),
        )
        drifts.append(
            Drift(
                marker=marker,
                expected_line=expected_lines[first] if first < len(expected_lines) else None,
                found_line=found_lines[first] if first < len(found_lines) else None,
                first_difference=_first_line(node) + first,
                copy_start=_first_line(node),
                copy_end=node.end_lineno,
                expected=expected,
            )
        )
    return drifts


def scanned_files(root: Path = REPO) -> list[Path]:
    """Every ``.py`` file of the folders that may hold marked copies."""
    return sorted(path for folder in SCANNED_FOLDERS for path in (root / folder).rglob("*.py"))


def check_copies(paths: list[Path]) -> list[str]:
    """One message per problem: a drifted copy (file, line, marker, first differing line) or a marker that cannot
    be checked."""
    problems = []
    for path in paths:
        try:
            problems += [drift.message() for drift in check_file(path)]
        except CopyError as error:
            problems.append(str(error))
    return problems


def fix_file(path: Path) -> int:
    """Rewrite the drifted copies of a file from their sources; returns how many were rewritten."""
    drifts = check_file(path)
    if not drifts:
        return 0
    lines = path.read_text().splitlines(keepends=True)
    # From the bottom up, so that the line numbers of the copies above stay valid.
    for drift in sorted(drifts, key=lambda d: d.copy_start, reverse=True):
        indent = MARKER.match(lines[drift.marker.line - 1])["indent"]
        new = textwrap.indent(drift.expected, indent) + "\n"
        lines[drift.copy_start - 1 : drift.copy_end] = [new]
    path.write_text("".join(lines))
    return len(drifts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their sources")
    args = parser.parse_args(argv)
    paths = scanned_files()
    if args.fix:
        for path in paths:
            try:
                count = fix_file(path)
            except CopyError:
                continue  # nothing to rewrite it from; the check below reports it
            if count:
                print(f"{path.relative_to(REPO)}: rewrote {count} cop{'y' if count == 1 else 'ies'}")
    problems = check_copies(paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
