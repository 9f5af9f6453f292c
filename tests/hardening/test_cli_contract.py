"""Class 8 of issue #16: what the CLI says matches what it has.

- Every ``--flag`` an error message or hint names exists: an error raised in a command's module
  names flags of that command (or of a command that imports the module); any other mention,
  in a library module, a hint or a docstring, names a flag of some command. Read from the real
  parsers, automatically.
- Every ``FastInsightError`` subclass's ``exit_code`` is the one documented in
  ``docs/exit-codes.md`` and in the README's exit-code sentence.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import fastinsight.errors as errors_module
from fastinsight.errors import FastInsightError

REPO = Path(__file__).resolve().parents[2]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# Flags of other programs that fastinsight runs (cuobjdump) or tells users to run (GDCM's
# gdcmconv), not of fastinsight.
EXTERNAL_FLAGS = {"--dump-resource-usage", "--raw"}


def _cli():
    return importlib.import_module("fastinsight.cli.main")


def _subparser(parser: argparse.ArgumentParser, names: list[str]) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _commands() -> dict[tuple[str, ...], tuple[str, set[str]]]:
    """(command words) -> (implementing module, its option strings), from the real parsers."""
    cli = _cli()
    found: dict[tuple[str, ...], tuple[str, set[str]]] = {}
    entries = [((name,), spec) for name, (spec, _) in cli.COMMANDS.items()]
    entries += [
        ((group, name), spec)
        for group, commands in cli.GROUPS.items()
        for name, (spec, _) in commands.items()
    ]
    for words, spec in entries:
        try:
            parser = _subparser(cli.build_parser(list(words)), list(words))
        except ImportError as exc:  # an optional extra (e.g. Triton) is not installed
            pytest.skip(f"cannot build `{' '.join(words)}`: {exc}")
        flags = {o for a in parser._actions for o in a.option_strings} | {"--help"}
        found[words] = (spec.partition(":")[0], flags)
    return found


def _flags_in(path: Path) -> list[tuple[int, str, bool]]:
    """``--flag`` mentions in a source file's string constants: (line, flag, in an error).

    ``in an error`` is True inside a ``raise`` statement (a message the user reads after typing
    this command). Flag definitions (``add_argument("--x", ...)``) are not mentions.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    definitions = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
    }
    in_raise = {id(n) for r in ast.walk(tree) if isinstance(r, ast.Raise) for n in ast.walk(r)}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in definitions:
                continue
            hits += [(node.lineno, m, id(node) in in_raise) for m in FLAG.findall(node.value)]
    return hits


def _imports(path: Path | None) -> set[str]:
    """Modules a source file imports (``import a.b``, ``from a.b import c``), anywhere in it."""
    if path is None:
        return set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin else None


def test_every_flag_a_message_names_exists() -> None:
    commands = _commands()
    everywhere = {"--version"}.union(*(flags for _, flags in commands.values()))
    # A command module's errors may name its own flags, and those of the commands whose modules
    # import it (``predict`` hands CT inputs to ``cli.volume``).
    by_module: dict[Path, set[str]] = {}
    sources = {m: _module_file(m) for m, _ in commands.values()}
    for module, flags in commands.values():
        path = sources[module]
        if path is None:
            continue
        by_module.setdefault(path.resolve(), set()).update(flags)
    for module, flags in commands.values():
        for other in _imports(sources[module]) & set(sources) - {module}:
            other_path = sources[other]
            if other_path is not None:
                by_module.setdefault(other_path.resolve(), set()).update(flags)
    roots = [REPO / "fastinsight", REPO / "kernels", REPO / "export"]
    wrong = []
    for root in roots:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else []:
            own = by_module.get(path.resolve())
            for line, flag, in_error in _flags_in(path):
                strict = own is not None and in_error
                allowed = own if strict else everywhere
                if flag not in allowed and flag not in EXTERNAL_FLAGS:
                    where = "its command" if strict else "any command"
                    wrong.append(f"{path.relative_to(REPO)}:{line}: {flag} (not a flag of {where})")
    assert not wrong, "messages name flags that do not exist:\n" + "\n".join(wrong)


def _error_classes() -> list[type[FastInsightError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(cls, FastInsightError) and cls is not FastInsightError
    ]


def _documented_codes() -> dict[str, int]:
    """``ErrorClass -> code`` from the table in docs/exit-codes.md."""
    table = (REPO / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    codes = {}
    for m in re.finditer(r"^\| (\d+) \|[^\n]*\| `(\w+)` \|$", table, flags=re.M):
        codes[m.group(2)] = int(m.group(1))
    return codes


def test_every_error_class_has_its_documented_exit_code() -> None:
    documented = _documented_codes()
    for cls in _error_classes():
        # A subclass that keeps its parent's code is documented with the parent.
        name = next(
            c.__name__ for c in cls.__mro__ if c.__name__ in documented or c is FastInsightError
        )
        assert name in documented, (
            f"{cls.__name__} (exit {cls.exit_code}) is not in docs/exit-codes.md"
        )
        assert cls.exit_code == documented[name], (
            f"{cls.__name__}.exit_code = {cls.exit_code}, docs/exit-codes.md says {documented[name]}"
        )
    assert len(set(documented.values())) == len(documented), "two classes share a documented code"


# The README's one-sentence summary ("Exit codes: 3 model file, 4 input data, ...") names each
# code by a phrase; each phrase belongs to one class.
README_PHRASES = {
    "model file": "CheckpointError",
    "input data": "InputError",
    "slide": "SlideError",
    "output path": "OutputError",
    "missing backend": "BackendError",
    "bad option": "ConfigError",
}


def test_readme_exit_codes_agree_with_the_classes() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"Exit codes:(.*?)(?:\.\s|\.$)", readme, flags=re.S)
    assert m, "README.md has no 'Exit codes:' sentence"
    classes = {cls.__name__: cls for cls in _error_classes()}
    pairs = re.findall(r"(\d+) ([a-z][a-z ]+?)(?: \(|,|$)", " ".join(m.group(1).split()))
    assert pairs, m.group(1)
    checked = 0
    for code, phrase in pairs:
        name = README_PHRASES.get(phrase.strip())
        if name is None or name not in classes:
            continue
        assert classes[name].exit_code == int(code), (
            f"README says {code} is '{phrase}', but {name}.exit_code = {classes[name].exit_code}"
        )
        checked += 1
    assert checked >= 5, pairs
