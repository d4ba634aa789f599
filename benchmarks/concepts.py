"""How many concepts the package holds: functions and classes (by AST) and lines, over src/.

    python benchmarks/concepts.py            # the totals
    python benchmarks/concepts.py --files    # and per file, largest first

A function is every ``def`` and ``async def`` (methods, nested functions and properties
included), a class every ``class``; lines are every line of every .py file, blank and comment
lines included (what a reader scrolls through). Issue 25's targets: at most 430 functions +
classes and 8,500 lines.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclasses.dataclass(frozen=True)
class Count:
    """One file's (or the tree's) functions, classes and lines."""

    functions: int
    classes: int
    lines: int

    @property
    def concepts(self) -> int:
        return self.functions + self.classes

    def __add__(self, other: Count) -> Count:
        return Count(
            self.functions + other.functions, self.classes + other.classes, self.lines + other.lines
        )


def count(path: Path) -> Count:
    """The functions, classes and lines of one Python file."""
    text = path.read_text()
    nodes = list(ast.walk(ast.parse(text, filename=str(path))))
    functions = sum(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in nodes)
    classes = sum(isinstance(n, ast.ClassDef) for n in nodes)
    return Count(functions, classes, len(text.splitlines()))


def count_tree(root: Path = SRC) -> dict[Path, Count]:
    """Every .py file under ``root`` (relative path -> its Count)."""
    return {path.relative_to(root): count(path) for path in sorted(root.rglob("*.py"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", action="store_true", help="also one line per file")
    args = parser.parse_args()
    files = count_tree()
    total = sum(files.values(), Count(0, 0, 0))
    if args.files:
        for path, c in sorted(files.items(), key=lambda item: -item[1].concepts):
            print(f"{c.concepts:5d} {c.functions:5d} {c.classes:4d} {c.lines:6d}  {path}")
    print(
        f"src/: {total.concepts} functions + classes ({total.functions} functions, "
        f"{total.classes} classes), {total.lines} lines in {len(files)} files"
    )


if __name__ == "__main__":
    main()
