"""Every `clipdex` command in the README's shell blocks runs, in order, offline, and exits 0.

The commands run as written in a sandbox that has what they name (a home with ~/Pictures, captions.csv, query.jpg,
labelled/, pairs.csv, data/flickr30k, ...), with the test model standing in for the weights a tag would download:
`--model NAME`/`--pretrained TAG` become the tiny config and checkpoint, and a command that loads a model by default
gets them added. Lines that cannot run here are named in SKIPPED with the reason.
"""

from __future__ import annotations

import random
import re
import shlex
from pathlib import Path

import pytest
from corpus import make_coco_fixture, make_domain_pairs, make_flickr_fixture, make_images, make_karpathy_fixture

README = Path(__file__).resolve().parent.parent / "README.md"

# (what a line contains, why it does not run here)
SKIPPED = [
    ("pip install", "installs packages"),
    ("clipdex serve", "runs until stopped (tests/test_server.py runs the server)"),
    ("clipdex watch", "runs until stopped (tests/test_watch.py runs the watcher)"),
    ("--engine ray", "Ray is an optional extra (tests/test_ray.py, where it is installed)"),
    ("/data/", "a folder on the user's machine"),
    ("s3-copy-of-emb", "a folder on the user's machine"),
]
MODEL_COMMANDS = {"index", "eval", "finetune", "embed"}  # load a model, ViT-B-32 with downloaded weights by default


def readme_commands() -> list[str]:
    """The `clipdex` command lines of the README's bash blocks, in order, comments and pipes cut off."""
    lines, inside = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        command = line.split(" | ")[0].strip()
        if inside and command:
            lines.extend(part.strip() for part in command.split("&&"))
    return [line for line in lines if line.startswith("clipdex ")]


def make_sandbox(root: Path) -> tuple[Path, Path]:
    """(home, working folder) holding every file and folder the README's commands name."""
    home, work = root / "home", root / "work"
    pictures = home / "Pictures"
    make_images(pictures, 10, seed=1, ext=".jpg")
    make_images(pictures / "2019", 3, seed=2, start=10)
    make_images(pictures / "2024", 3, seed=3, start=20, ext=".jpg")
    made = [path for path, _ in make_images(home / "Downloads", 2, seed=4, ext=".jpg")]
    made[0].rename(home / "Downloads" / "cat.jpg")
    made[1].rename(pictures / "screenshot.png")
    work.mkdir()
    made = [path for path, _ in make_images(root / "queries", 2, seed=6, ext=".jpg")]
    made[0].rename(work / "query.jpg")
    made[1].rename(work / "mood.jpg")
    rng = random.Random(0)
    rows = [f"captioned/{p.name},{s.captions(rng, 1)[0]}" for p, s in make_images(work / "captioned", 4, seed=7)]
    (work / "captions.csv").write_text("\n".join(["image,caption", *rows]) + "\n")
    for label, seed in (("cat", 8), ("dog", 9)):
        make_images(work / "labelled" / label, 2, seed=seed)
    (work / "templates.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    make_domain_pairs(work, 48, seed=1)
    make_domain_pairs(work, 16, seed=2, name="test.csv")
    make_flickr_fixture(work / "data" / "flickr30k", 12, seed=3)
    make_coco_fixture(work / "data" / "coco", 12, seed=5)
    make_karpathy_fixture(work / "data" / "flickr30k", "flickr30k", 20, seed=4)
    return home, work


def offline(argv: list[str], tiny_model, *, first_id: int) -> list[str]:
    """The command with the test model for any weights it names or would download, and a real item id."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("--model", "--pretrained"):
            value = next(args)
            known = Path(value).expanduser().exists()
            out += [arg, value if known else str(tiny_model.config if arg == "--model" else tiny_model.weights)]
        elif arg == "--like":
            next(args)
            out += [arg, str(first_id)]  # an id of the user's index
        else:
            out.append(arg)
    # eval --index and index of an existing index use the index's own model
    uses_index_model = "--index" in argv and (argv[0] == "eval" or Path(argv[argv.index("--index") + 1]).exists())
    if argv[0] in MODEL_COMMANDS and "--model" not in out and not uses_index_model:
        out += ["--model", str(tiny_model.config)]
        if "--pretrained" not in out:
            out += ["--pretrained", str(tiny_model.weights)]
    return out


def _first_id(cli, app, argv: list[str]) -> int:
    """An item id of the index a command names (the README's `--like 1234` is the user's own id)."""
    import json

    where = argv[argv.index("--index") + 1]
    result = cli.invoke(app, ["search", "a red circle", "--index", where, "--json", "-k", "1"])
    return int(json.loads(result.stdout)["results"][0]["id"])


def test_readme_lists_the_commands_this_test_runs():
    commands = readme_commands()
    assert len(commands) > 30
    assert any(c.startswith("clipdex index ~/Pictures --index ~/pictures.idx") for c in commands)


def test_every_readme_command_runs(cli, tmp_path, tiny_model, monkeypatch):
    from clipdex.cli.main import app

    home, work = make_sandbox(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    ran, skipped = [], []
    for line in readme_commands():
        if any(needle in line for needle in (s for s, _ in SKIPPED)):
            skipped.append(line)
            continue
        argv = [Path(a).expanduser().as_posix() if a.startswith("~") else a for a in shlex.split(line, comments=True)]
        first_id = _first_id(cli, app, argv) if "--like" in argv else 0
        argv = offline(argv[1:], tiny_model, first_id=first_id)
        result = cli.invoke(app, argv)
        assert result.exit_code == 0, f"{line}\n-> exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, line
        ran.append(line)
    assert len(ran) >= 30, ran
    assert all(re.search(r"pip install|serve|watch|ray|/data/|s3-copy", s) for s in skipped), skipped


@pytest.mark.parametrize("line", [c for c in readme_commands() if c.startswith("clipdex ")])
def test_readme_command_parses(line):
    """Each README command names options that exist (click parses it), whether or not it runs here."""
    from typer.main import get_command

    from clipdex.cli.main import app

    group = get_command(app)
    argv = shlex.split(line, comments=True)[1:]
    command = group.commands[argv[0]]  # type: ignore[attr-defined]
    ctx = command.make_context(argv[0], [a for a in argv[1:]], resilient_parsing=True)
    unknown = [a for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in _option_names(command)]
    assert not unknown, (line, unknown)
    assert ctx is not None


def _option_names(command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
