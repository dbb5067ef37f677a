"""The manual (README.md and docs/*.md): links resolve, every flag is documented.

The flags come from each command's own argparse parser (its module's
`build_parser()`), so a flag added to a command without a line in its page fails
here, naming the flag and the page.
"""
import importlib
import re

import pytest

from conftest import ROOT
from stl10_keras.config import preset

# command -> ("module" or "module:function" building the command's parser, its
# page); the function defaults to build_parser.
# Flags a command shares with `train` (the config flags of ablation and
# pipelines.run) may be documented on train's page instead of the command's own.
COMMANDS = {
    "train": ("stl10_keras.cli:build_train_parser", "docs/training.md"),
    "gradcheck": ("stl10_keras.gradcheck", "docs/backprop.md"),
    "ablation": ("stl10_keras.ablation", "docs/ablation.md"),
    "embed": ("stl10_keras.embed", "docs/embeddings.md"),
    "serve": ("stl10_keras.serve", "docs/serving.md"),
    "predict": ("stl10_keras.predict", "docs/serving.md"),
    "pipelines.run": ("pipelines.run", "docs/pipeline.md"),
    "export": ("stl10_keras.export", "docs/export.md"),
}
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def long_options(command: str) -> set[str]:
    """The `--flags` of a command, from the parser its module builds (no run)."""
    module, _, function = COMMANDS[command][0].partition(":")
    parser = getattr(importlib.import_module(module), function or "build_parser")()
    return {o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"}


def mentions(text: str, flag: str) -> bool:
    """True when `flag` stands alone in `text` (`--augment` is not `--augment-on`)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    found, counts = set(), {}
    for title in HEADING.findall(FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")  # repeated titles: -1, -2, ...
    return found


def test_anchors_follow_github_slugs():
    text = ("# Presets, and the lab's learning rate\n"
            "```\n# not a heading\n```\n## Measured\n")
    assert anchors(text) == {"presets-and-the-labs-learning-rate", "measured"}
    assert anchors("## Notes\n## Notes\n") == {"notes", "notes-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    text = page.read_text()
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif (anchor and dest.suffix == ".md"
              and anchor not in anchors(dest.read_text())):
            broken.append(f"{target} (no heading with that anchor in {dest.name})")
    rel = page.relative_to(ROOT)
    assert not broken, f"{rel} links to what does not exist: {', '.join(broken)}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_of_the_command_is_on_its_page(command):
    page = COMMANDS[command][1]
    text = (ROOT / page).read_text()
    train_page = COMMANDS["train"][1]
    shared = long_options("train") if command != "train" else set()
    training_text = (ROOT / train_page).read_text()
    missing = sorted(
        flag for flag in long_options(command)
        if not mentions(text, flag)
        and not (flag in shared and mentions(training_text, flag)))
    assert not missing, (f"{page} does not document these flags of {command}: "
                         f"{', '.join(missing)}")


def test_training_page_documents_every_train_flag_and_the_run_names():
    page = (ROOT / COMMANDS["train"][1]).read_text()
    options = long_options("train")
    flags = re.compile(r"[`/](--[a-z][a-z-]*)")  # `--augment/--no-augment`
    assert options - set(flags.findall(page)) == set()  # each is documented
    assert set(flags.findall(page)) - options == set()  # no missing flag is
    # The documented default names, for each kind of preset.
    assert "`runs/DATASET_VARIANT[_PRESET]_sSEED`" in page
    from stl10_keras.cli import default_run_name

    assert default_run_name(preset("default", "digits")) == "digits_kmeans12_s0"
    assert default_run_name(preset("smoke", "digits", "baseline")) \
        == "digits_baseline_smoke_s0"
    assert preset("smoke", "digits").train.epochs == 1  # docs: smoke keeps 1 epoch
