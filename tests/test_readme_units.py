"""The README's commands run as shown, the part that needs no process: every `amused ...`
command the README shows (in a code block, or as an inline code span) names a real
subcommand and real flags, and a code-block line is accepted whole by the command's own
parser (placeholders such as CKPT are plain strings to it). The marked tiny blocks are run
by test_readme.py, which takes the extractor from here."""
from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from amused.orchestration.cli import build_parser

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w ]+?)\s*-->")
FENCE = re.compile(r"^(\s*)```")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    text: str
    marks: frozenset[str]


def code_blocks(markdown: str) -> list[Block]:
    """Fenced blocks, each with the marks of a `readme-test` comment on the line before it."""
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group(1)), i
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:])
            i += 1
        marker = MARKER.search(lines[start - 1]) if start else None
        blocks.append(Block(start + 1, "\n".join(body), frozenset(marker.group(1).split()) if marker else frozenset()))
        i += 1
    return blocks


def indented_code(markdown: str) -> list[tuple[int, str]]:
    """Lines of indented code (a line after a blank one, indented deeper than list text) that hold a command."""
    lines = markdown.splitlines()
    return [(n + 1, line.strip()) for n, line in enumerate(lines)
            if n and not lines[n - 1].strip() and line.startswith("      amused ")]


def commands(text: str) -> list[str]:
    """Shell lines of a block, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


def amused_argv(command: str) -> list[str] | None:
    """The arguments after `amused` (or `-m amused.orchestration.cli` under a launcher); None if it runs something else."""
    words = shlex.split(command)
    if words and words[0] == "amused":
        return words[1:]
    if "amused.orchestration.cli" in words:
        return words[words.index("amused.orchestration.cli") + 1:]
    return None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def known_flags(words: list[str]) -> tuple[list[str], set[str]]:
    """The subcommand path at the start of `words` and the flags its parser accepts."""
    parser, path = build_parser(), []
    flags = {flag for a in parser._actions for flag in a.option_strings}  # the top level's go before the command
    for word in words:
        sub = _subparsers(parser)
        if word not in sub:
            break
        parser, path = sub[word], [*path, word]
    return path, flags | {flag for a in parser._actions for flag in a.option_strings}


def test_the_extractor_reads_marks_continuations_and_launchers():
    text = ("x\n<!-- readme-test: tiny slow -->\n```bash\namused a \\\n  --b c   # note\n```\n"
            "  ```\n  torchrun -m amused.orchestration.cli train c.yaml\n  ```\n")
    first, second = code_blocks(text)
    assert first.marks == {"tiny", "slow"} and first.line == 3 and not second.marks
    assert commands(first.text) == ["amused a --b c"]
    assert [amused_argv(c) for c in commands(second.text)] == [["train", "c.yaml"]]
    assert amused_argv("python -c 'print(1)'") is None


def test_every_readme_code_line_parses_as_shown():
    markdown = README.read_text()
    lines = [(b.line, c) for b in code_blocks(markdown) for c in commands(b.text)] + indented_code(markdown)
    checked, wrong = 0, []
    for line, command in lines:
        argv = amused_argv(command)
        if argv is None:
            continue
        try:
            build_parser().parse_args(argv)
            checked += 1
        except SystemExit:
            wrong.append(f"README.md:{line}: {command}")
    assert not wrong, "README commands the CLI refuses (run one to see why):\n" + "\n".join(wrong)
    assert checked >= 10, f"only {checked} commands found: the extractor has lost the README's blocks"


def test_every_inline_amused_command_names_real_flags():
    wrong, checked = [], 0
    # HTML comments are not shown to a reader (they hold notes about what is not there yet).
    shown = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), README.read_text(), flags=re.S)
    for n, line in enumerate(shown.splitlines(), 1):
        for span in re.findall(r"`(amused [^`]+)`", line):
            words = span.replace("[", " ").replace("]", " ").replace("|", " ").split()[1:]
            path, flags = known_flags(words)
            if not path and not all(w.startswith("-") for w in words):
                wrong.append(f"README.md:{n}: `{span}`: no such subcommand")
                continue
            unknown = [w.split("=")[0] for w in words if w.startswith("--") and w.split("=")[0] not in flags]
            if unknown:
                wrong.append(f"README.md:{n}: `{span}`: {' '.join(path)} has no {', '.join(unknown)}")
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 20


def test_the_checks_see_a_wrong_command():
    assert known_flags(["evaluate", "--checkpoint", "X"])[0] == ["evaluate"]
    assert "--prompts" in known_flags(["evaluate"])[1] and "--version" in known_flags([])[1]
    assert "--prompts" not in known_flags(["sample"])[1]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--checkpoint", "CKPT"])  # the README's old line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_links_reach_their_anchors():
    # The tuning history moved to benchmarks/RESULTS.md: links into it must still land.
    wrong = []
    for n, line in enumerate(README.read_text().splitlines(), 1):
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)#([\w-]+)\)", line):
            doc = README if not target else ROOT / target
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", doc.read_text(), re.M)}
            if anchor not in anchors:
                wrong.append(f"README.md:{n}: {target}#{anchor}")
    assert not wrong, "links to anchors that do not exist:\n" + "\n".join(wrong)
    assert slug("int8 sampling (`amused sample --quantize int8`)") == "int8-sampling-amused-sample---quantize-int8"
