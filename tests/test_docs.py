"""The docs site: the API reference names every public name, the docstrings' examples
run, the guides' code runs, and the pages' links resolve. (`mkdocs build --strict` in
CI checks the rest: that every reference renders and every linked page exists.)"""

from __future__ import annotations

import doctest
import inspect
import re
from pathlib import Path

import pytest
from conftest import run_python
from markdown.extensions.toc import slugify

import shardsave
import shardsave.errors

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.md"
README = ROOT / "README.md"

# Records whose fields their Attributes section describes: nothing to run.
RECORDS = {"CheckpointState", "RestoreInfo", "SaveInfo", "VariableInfo"}
# Public entry points whose docstring has no example yet. Remove a name once its
# docstring has one; the test fails until then, and fails if a new one lacks one.
WITHOUT_EXAMPLE: set[str] = set()


def _error_classes() -> list[str]:
    return sorted(
        name
        for name, obj in vars(shardsave.errors).items()
        if inspect.isclass(obj) and obj.__module__ == shardsave.errors.__name__
    )


def _reference_entries() -> list[str]:
    return re.findall(r"^::: (\S+)$", API.read_text(), flags=re.M)


def test_the_api_reference_names_every_public_name():
    entries = set(_reference_entries())
    wanted = {f"shardsave.{n}" for n in shardsave.__all__} | {
        f"shardsave.errors.{c}" for c in _error_classes()
    }
    assert len(_error_classes()) >= 10
    assert not wanted - entries, f"missing from docs/api.md: {sorted(wanted - entries)}"


def test_every_reference_entry_names_a_public_object_through_the_package():
    for entry in _reference_entries():
        # Private modules are about to move: the reference goes through the package.
        assert not any(part.startswith("_") for part in entry.split(".")), entry
        obj: object = shardsave
        for part in entry.split(".")[1:]:
            obj = getattr(obj, part)  # AttributeError: the entry names nothing


def _documented() -> list[tuple[str, object]]:
    """Every public name, and the public methods and properties of public classes."""
    objects: list[tuple[str, object]] = []
    for name in shardsave.__all__:
        obj = getattr(shardsave, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # FORMAT_VERSION (an int), errors (a module: its classes follow)
        objects.append((f"shardsave.{name}", obj))
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                target = value.fget if isinstance(value, property) else value
                if inspect.isfunction(target):
                    objects.append((f"shardsave.{name}.{member}", target))
    objects += [(f"shardsave.errors.{c}", getattr(shardsave.errors, c)) for c in _error_classes()]
    return objects


def _doctests(name: str, obj: object) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(obj, name, globs={}) if t.examples]


def test_every_public_entry_point_has_an_example():
    without = {
        name.removeprefix("shardsave.")
        for name, obj in _documented()
        if name.count(".") == 1
        and name.removeprefix("shardsave.") not in RECORDS
        and not _doctests(name, obj)
    }
    assert without == WITHOUT_EXAMPLE, (
        f"public names without a runnable example: {sorted(without - WITHOUT_EXAMPLE)}; "
        f"with one now (drop them from WITHOUT_EXAMPLE): {sorted(WITHOUT_EXAMPLE - without)}"
    )


def test_the_docstring_examples_run():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for name, obj in _documented() for t in _doctests(name, obj)]
    assert len(tests) >= 10, [t.name for t in tests]
    report: list[str] = []
    for test in tests:
        failed = runner.run(test, out=report.append).failed
        assert not failed, f"{test.name}:\n" + "".join(report)


# ---------------------------------------------------------------- the guides' code blocks

# Pages whose ```python blocks run, in this order, after the README's quick start
# (which defines saver, path, state and mesh for them). index.md comes first: it
# is self-contained and its names would otherwise shadow the quick start's.
RUN_ORDER = [
    "index.md",
    "README",
    "guides/restore.md",
    "guides/weights.md",
    "guides/pytorch.md",
    "guides/object-stores.md",
    "guides/orbax.md",
    "guides/tiers.md",
]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_guides_code_runs():
    pages = {p.relative_to(DOCS).as_posix(): p for p in sorted(DOCS.rglob("*.md"))}
    with_code = {name for name, p in pages.items() if _python_blocks(p.read_text())}
    assert with_code == set(RUN_ORDER) - {"README"}, (
        f"pages with code that the test does not run: {with_code}"
    )
    readme = [b for b in _python_blocks(README.read_text()) if "optax" not in b]  # the quick start
    program: list[str] = []
    for name in RUN_ORDER:
        program += readme if name == "README" else _python_blocks(pages[name].read_text())
    program.append('print("docs ran")')
    assert run_python("\n".join(program), devices=8).strip().endswith("docs ran")


# ---------------------------------------------------------------- links between pages

_SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::(\w+))?"$', flags=re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _expanded(page: Path) -> str:
    """The page with its snippets (pymdownx.snippets, base path the repository) included."""

    def include(m: re.Match[str]) -> str:
        text = (ROOT / m.group(1)).read_text()
        if m.group(2):
            start, end = f"--8<-- [start:{m.group(2)}]", f"--8<-- [end:{m.group(2)}]"
            assert start in text and end in text, f"{page}: no section {m.group(2)} in {m.group(1)}"
            text = text.split(start, 1)[1].split(end, 1)[0]
        return text

    return _SNIPPET.sub(include, page.read_text())


def _anchors(text: str) -> set[str]:
    return {slugify(h.strip(), "-") for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")))
def test_links_between_pages_resolve(page):
    source = DOCS / page
    text = _expanded(source)
    for target in _LINK.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue  # another site
        file, _, anchor = target.partition("#")
        linked = (source.parent / file).resolve() if file else source
        assert linked.is_relative_to(DOCS), f"{page}: {target} leaves the docs (the site cannot link there)"
        assert linked.is_file(), f"{page}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(_expanded(linked)), f"{page}: {target}: no such heading"
