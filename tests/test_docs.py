"""The docs name what exists: every `seer` command line in their shell blocks parses with seer's own parser,
every config key they quote is a key of RunConfig, and every repository path they quote is there (a renamed
flag, key or file leaves the docs telling users to type or open what is not)."""
import dataclasses
import glob
import re
import shlex
from pathlib import Path

import pytest

from seer.cli import _parser
from seer.config import RunConfig
from seer.plan import _parser as plan_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def _command_lines(text: str) -> list[str]:
    """The arguments after `seer` (or `-m seer`) of each command in the ```bash blocks, without comments and
    with optional arguments' brackets (`[--layer -1]`) dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            m = re.search(r"(?:^|-m )seer (.*)", line)
            if m:
                out.append(m.group(1).replace("[", "").replace("]", ""))
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_seer_command_in_the_docs_parses(doc):
    lines = _command_lines((ROOT / doc).read_text())
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "bench":  # pytest's own arguments
            continue
        try:
            if argv[0] == "plan":
                plan_parser().parse_args(argv[1:])
            else:
                _parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc}: `seer {line}` does not parse")
    if doc == "docs/training.md":
        assert len(lines) > 20  # the extraction found the commands


def _config_keys(obj, prefix="") -> set[str]:
    out = set()
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        out |= {key} | (_config_keys(value, key + ".") if dataclasses.is_dataclass(value) else set())
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_config_key_the_docs_quote_exists(doc):
    keys = _config_keys(RunConfig())
    sections = sorted({k.split(".")[0] for k in keys})
    # section.key[.key] inside `...`, not part of a longer name (seer.eval.image_paths) or a call (x.y())
    key = re.compile(r"(?<![\w./-])((?:%s)\.[a-z_]+(?:\.[a-z_]+)*)(?![\w(/])" % "|".join(sections))
    text = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.S)
    unknown = [(k, span) for span in re.findall(r"`([^`]+)`", text) if "unknown config key" not in span
               for k in key.findall(span)
               if k not in keys and k.rsplit(".", 1)[1] not in ("json", "log", "yaml", "md", "py")]
    assert not unknown, f"{doc} quotes config keys that do not exist: {unknown}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_path_the_docs_quote_exists(doc):
    top = "seer|seer_kernels|bench|tests|csrc|scripts|docs"
    path = re.compile(r"(?<![\w./-])((?:%s)/[\w./*-]+)" % top)
    quoted = {p.rstrip(".") for span in re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text())
              for p in path.findall(span)}
    missing = sorted(p for p in quoted if not glob.glob(str(ROOT / p)))
    assert not missing, f"{doc} quotes paths that are not in the repository: {missing}"


def test_every_flag_of_seer_is_documented():
    """Each command's flags are named in README.md or docs/*.md (seer eval --json and most of seer plan's were in
    --help only); a --flag whose --no-flag twin is named counts."""
    import argparse
    text = "".join((ROOT / doc).read_text() for doc in DOCS)

    def flags(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from flags(p, f"{name} {sub}")
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    yield name, flag

    missing = [(name, flag) for name, flag in [*flags(_parser(), "seer"), *flags(plan_parser(), "seer plan")]
               if flag not in text and "--no-" + flag[2:] not in text]
    assert not missing, f"flags that no doc names: {missing}"
