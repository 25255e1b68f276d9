"""The docs say what the code does: the generated sections equal the code's output, the README stays a short front
page that names every docs page, every relative link resolves, and every documented command of a project module
parses with that module's own argument parser.

Fast by design: nothing runs in a subprocess, no model is built; the commands are only parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

from pipelines.core.schemas import markdown
from pipelines.shards.writer import shard_code_files

README_MAX_BYTES = 15_000
SCHEMAS_PAGE = "docs/reference/schemas.md"
REPRODUCIBILITY_PAGE = "docs/reference/reproducibility.md"
# Commands of these packages are checked; `ray`, `make`, `pip`, `python -m pytest` and the like are not.
PROJECT_PACKAGES = ("jobs", "training", "model", "pipelines", "evaluation", "inference")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
ELISION = "..."  # "the same flags as above": required options may be left out, unknown ones may not


def doc_paths(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def marked_section(path: Path, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    assert start in text and end in text, f"{path.name} lacks the markers {start} ... {end}"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


# ---- generated sections ----------------------------------------------------------------------------------------


def test_schemas_page_matches_schemas(repo_root: Path) -> None:
    section = marked_section(repo_root / SCHEMAS_PAGE, "schemas")
    assert section == markdown().strip(), (
        f"the schema section of {SCHEMAS_PAGE} is stale: regenerate it with `python -m pipelines.core.schemas --docs`"
    )


def shard_code_section(root: Path) -> str:
    """The expected body of the shard-code section: the files the shard code version hashes, repo-relative."""
    files = shard_code_files()
    assert files, (
        "pipelines.shards.writer.shard_code_files() returned no files, so code_version() hashes nothing: "
        "check the repository root it defaults to"
    )
    return "\n".join(f"- `{path.resolve().relative_to(root).as_posix()}`" for path in sorted(files))


def test_reproducibility_page_lists_the_shard_code_files(repo_root: Path) -> None:
    expected = shard_code_section(repo_root)
    section = marked_section(repo_root / REPRODUCIBILITY_PAGE, "shard-code")
    assert section == expected, (
        f"the shard-code section of {REPRODUCIBILITY_PAGE} differs from "
        "pipelines.shards.writer.shard_code_files(); replace the text between "
        f"<!-- shard-code:start --> and <!-- shard-code:end --> with:\n\n{expected}\n"
    )


# ---- the front page and links -----------------------------------------------------------------------------------


def test_readme_is_a_short_front_page(repo_root: Path) -> None:
    size = (repo_root / "README.md").stat().st_size
    assert size < README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (move detail to docs/)"
    )


def test_readme_links_every_docs_page(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    missing = [
        path.relative_to(repo_root).as_posix()
        for path in sorted((repo_root / "docs").rglob("*.md"))
        if path.relative_to(repo_root).as_posix() not in readme
    ]
    assert (repo_root / "docs").is_dir() and not missing, f"README.md does not mention: {missing}"


FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where markdown links live."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(INLINE_CODE.sub("", line))
    return "\n".join(kept)


def test_relative_links_resolve(repo_root: Path) -> None:
    broken = []
    for path in doc_paths(repo_root):
        for target in LINK.findall(prose(path.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor of the same page
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(repo_root)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


# ---- documented commands ----------------------------------------------------------------------------------------


def code_block_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of every line inside fenced code blocks, backslash continuations joined."""
    fenced, pending, first = False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""


def project_invocations(tokens: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(module, arguments) of each `python -m <module> ...` or `accelerate launch [flags] -m <module> ...` of a
    project package in one shell line's tokens."""
    for i, token in enumerate(tokens):
        start = None
        if re.fullmatch(r"python(3(\.\d+)?)?", Path(token).name) and tokens[i + 1 : i + 2] == ["-m"]:
            start = i + 2
        elif token == "accelerate" and tokens[i + 1 : i + 2] == ["launch"] and "-m" in tokens[i + 2 :]:
            start = tokens.index("-m", i + 2) + 1
        if start is None or start >= len(tokens):
            continue
        module = tokens[start]
        if module.split(".")[0] not in PROJECT_PACKAGES:
            continue
        args: list[str] = []
        for argument in tokens[start + 1 :]:
            if argument in SHELL_OPERATORS:
                break
            args.append(argument)
        yield module, args


class _Parsed(Exception):
    """Raised in place of running a `main` once its arguments have parsed."""


def argument_parser_of(module: ModuleType) -> Callable[[list[str]], object] | None:
    """How a module parses a command line: its `parse_args(argv)`, else `build_parser().parse_args`, else its
    `main(argv)` stopped right after the first argparse `parse_args` call (e.g. `model.tiny`, which builds its
    parser inside `main`); None when it has none of these."""
    if callable(getattr(module, "parse_args", None)):
        return module.parse_args
    if callable(getattr(module, "build_parser", None)):
        return lambda argv: module.build_parser().parse_args(argv)
    if not callable(getattr(module, "main", None)):
        return None

    def parse_through_main(argv: list[str]) -> object:
        real = argparse.ArgumentParser.parse_args

        def parse_then_stop(self: argparse.ArgumentParser, args: Sequence[str] | None = None, namespace=None):
            real(self, args, namespace)
            raise _Parsed

        with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
            try:
                module.main(argv)
            except _Parsed:
                return None
        raise LookupError("its main(argv) returned without parsing arguments with argparse")

    return parse_through_main


def command_problem(module_name: str, args: list[str]) -> str | None:
    """Why `python -m module_name args` would not get past argument parsing, or None when it would."""
    try:
        found = importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return f"no module {module_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"module {module_name} cannot be imported: {exc}"
    parse = argument_parser_of(module)
    if parse is None:
        return (
            f"module {module_name} cannot be parsed by this test: it has no parse_args(argv), build_parser() or "
            "main(argv); give it one, or keep its command out of code blocks"
        )
    elided = ELISION in args
    argv = [argument for argument in args if argument != ELISION]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as exc:
        message = stderr.getvalue().strip().splitlines()[-1:] or [f"exit status {exc.code}"]
        if exc.code in (0, None) or (elided and "the following arguments are required" in message[0]):
            return None
        return message[0]
    except LookupError as exc:
        return f"module {module_name} cannot be parsed by this test: {exc}"
    return None


def documented_commands(root: Path) -> list[tuple[str, str, list[str]]]:
    commands = []
    for path in doc_paths(root):
        for number, line in code_block_lines(path.read_text()):
            if not re.search(r"(python|accelerate)\S*\s.*-m\s", line):
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as exc:
                commands.append((f"{path.relative_to(root)}:{number}", f"<unreadable: {exc}>", [line]))
                continue
            for module, args in project_invocations(tokens):
                commands.append((f"{path.relative_to(root)}:{number}", module, args))
    return commands


def test_documented_commands_parse(repo_root: Path) -> None:
    commands = documented_commands(repo_root)
    assert len(commands) >= 10, f"expected the docs' job commands, found only {commands}"
    problems = []
    for where, module, args in commands:
        problem = (
            f"cannot split the line: {module}" if module.startswith("<unreadable") else command_problem(module, args)
        )
        if problem:
            problems.append(f"{where}: python -m {module} {shlex.join(args)}\n    -> {problem}")
    assert not problems, "documented commands that do not parse:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "python -m jobs.ingest --input IN --output OUT   # comment",
            [("jobs.ingest", ["--input", "IN", "--output", "OUT"])],
        ),
        (
            "ray job submit --address http://HEAD:8265 -- .venv/bin/python -m jobs.shards --data OUT && ls",
            [("jobs.shards", ["--data", "OUT"])],
        ),
        (
            "accelerate launch --config_file a.yaml --machine_rank 1 -m training.train_icp ...",
            [("training.train_icp", ["..."])],
        ),
        ("python -m pytest -q", []),
        ("pip install -e .", []),
    ],
)
def test_command_extraction(line: str, expected: list) -> None:
    assert list(project_invocations(shlex.split(line, comments=True))) == expected


def test_command_checks_catch_mistakes() -> None:
    assert command_problem("jobs.shards", ["--data", "OUT"]) is None
    assert command_problem("jobs.nosuchjob", []) == "no module jobs.nosuchjob"
    assert "unrecognized arguments" in (command_problem("jobs.shards", ["--data", "OUT", "--no-such-flag"]) or "")
    assert "required" in (command_problem("jobs.shards", []) or "")
    assert command_problem("training.train_icp", [ELISION]) is None
    assert command_problem("model.tiny", ["DIR", "--seed", "1"]) is None
    assert "cannot be parsed" in (command_problem("pipelines.core.storage", []) or "")
