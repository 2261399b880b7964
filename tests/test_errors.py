"""Every user mistake: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import make_images

from clipdex.cli.main import app, app_for


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stdout} {result.stderr} {result.exception!r}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def photos(tmp_path):
    make_images(tmp_path / "photos", 4, seed=3)
    return tmp_path / "photos"


def test_a_folder_of_the_users_own_is_never_made_an_index(cli, photos, tmp_path, tiny_model):
    """`index ~/photos --index ~/photos`: refused in one line, before anything is written among the photos (for any
    command that writes an index). An empty folder, one with only hidden files, and one a killed first run left
    holding clipdex's own files all may become an index."""
    before = sorted(p.name for p in photos.iterdir())
    for argv in (
        ["index", str(photos), "--index", str(photos), *tiny_model.cli_args()],
        ["search", "a red circle", "--index", str(photos), "--no-server"],
    ):
        assert_one_line_error(cli.invoke(app, argv), "is not a clipdex index and holds other files", ".clipdex")
    assert sorted(p.name for p in photos.iterdir()) == before
    for name, own in (("empty", []), ("hidden", [".DS_Store"]), ("killed", ["write.lock", "vectors/"])):
        folder = tmp_path / name
        folder.mkdir()
        for f in own:
            (folder / f).mkdir() if f.endswith("/") else (folder / f).write_bytes(b"")
        result = cli.invoke(app, ["index", str(photos), "--index", str(folder), *tiny_model.cli_args()])
        assert result.exit_code == 0, (name, result.stderr)


def test_missing_and_empty_folders(cli, tmp_path, tiny_model):
    idx = str(tmp_path / "idx")
    assert_one_line_error(
        cli.invoke(app, ["index", str(tmp_path / "nope"), "--index", idx, *tiny_model.cli_args()]),
        "no such file or folder",
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    assert_one_line_error(
        cli.invoke(app, ["index", str(tmp_path / "empty"), "--index", idx, *tiny_model.cli_args()]), "no image files"
    )
    assert_one_line_error(cli.invoke(app, ["index", "--index", idx, *tiny_model.cli_args()]), "nothing to index")
    make_images(tmp_path / "all-out", 2, seed=4)
    assert_one_line_error(
        cli.invoke(app, ["index", str(tmp_path / "all-out"), "--index", idx, "--exclude", "*", *tiny_model.cli_args()]),
        "every image file under",
        "--exclude '*'",
    )


def test_missing_or_broken_index(cli, tmp_path):
    assert_one_line_error(cli.invoke(app, ["search", "dog", "--index", str(tmp_path / "none")]), "not found")
    assert_one_line_error(cli.invoke(app, ["info", "--index", str(tmp_path / "none")]), "not found")
    (tmp_path / "notidx").mkdir()
    assert_one_line_error(cli.invoke(app, ["info", "--index", str(tmp_path / "notidx")]), "no clipdex index")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{truncated")
    assert_one_line_error(cli.invoke(app, ["search", "dog", "--index", str(bad)]), "damaged")
    (bad / "manifest.json").write_text(json.dumps({"format_version": 99}))
    assert_one_line_error(cli.invoke(app, ["info", "--index", str(bad)]), "newer")


def test_model_errors(cli, tmp_path, photos, tiny_model):
    def index_with(model: str, pretrained: str):
        return cli.invoke(
            app, ["index", str(photos), "--index", str(tmp_path / "idx"), "--model", model, "--pretrained", pretrained]
        )

    assert_one_line_error(index_with("ViT-B-33", str(tiny_model.weights)), "unknown model", "ViT-B-32")
    assert_one_line_error(index_with(str(tiny_model.config), str(tmp_path / "missing.pt")), "checkpoint file not found")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    assert_one_line_error(
        index_with(str(tiny_model.config), str(garbage)), "is not a PyTorch or safetensors checkpoint"
    )
    assert_one_line_error(index_with("ViT-B-32", "no_such_tag"), "unknown pretrained tag", "laion2b_s34b_b79k")
    assert_one_line_error(
        index_with(str(tmp_path / "nope.json"), str(tiny_model.weights)), "model config file not found"
    )
    assert not (tmp_path / "idx").exists()  # nothing is created before the inputs are known to be good


def test_caption_file_errors(cli, tmp_path, photos, tiny_model):
    idx = str(tmp_path / "idx")
    args = [str(photos), "--index", idx, *tiny_model.cli_args()]
    assert_one_line_error(
        cli.invoke(app, ["index", *args, "--texts", str(tmp_path / "none.csv")]), "caption file not found"
    )
    bad = tmp_path / "caps.parquet"
    bad.write_bytes(b"PAR1 definitely not parquet")
    assert_one_line_error(cli.invoke(app, ["index", *args, "--texts", str(bad)]), "cannot read caption file")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("image,description\na.png,a dog\n")
    assert_one_line_error(
        cli.invoke(app, ["index", *args, "--texts", str(nocol)]), "no 'caption' or 'text' column", "description"
    )
    assert_one_line_error(
        cli.invoke(app, ["index", *args, "--texts", str(nocol), "--text-column", "title"]), "no column 'title'"
    )
    missing_images = tmp_path / "caps.csv"
    missing_images.write_text("image,caption\nnowhere/a.png,a dog\nnowhere/b.png,a cat\n")
    assert_one_line_error(cli.invoke(app, ["index", *args, "--texts", str(missing_images)]), "none of the image paths")
    assert_one_line_error(
        cli.invoke(app, ["index", *args, "--texts", str(tmp_path / "x.docx")]), "caption file not found"
    )
    (tmp_path / "x.docx").write_text("x")
    assert_one_line_error(
        cli.invoke(app, ["index", *args, "--texts", str(tmp_path / "x.docx")]), "unsupported caption file"
    )
    binary = tmp_path / "photo.csv"  # a JPEG renamed, or the wrong file picked
    binary.write_bytes(next(photos.iterdir()).read_bytes())
    assert_one_line_error(cli.invoke(app, ["index", *args, "--texts", str(binary)]), "is not a text file")
    latin = tmp_path / "latin.txt"  # an 8-bit text file is still text
    latin.write_bytes("un café\nune crème brûlée\n".encode("latin-1"))
    assert cli.invoke(app, ["index", *args, "--texts", str(latin)]).exit_code == 0


def test_search_usage_errors(cli, tmp_path, photos, tiny_model):
    idx = str(tmp_path / "idx")
    assert cli.invoke(app, ["index", str(photos), "--index", idx, *tiny_model.cli_args()]).exit_code == 0
    assert_one_line_error(cli.invoke(app, ["search", "--index", idx]), "give a text query, --image FILE or --like ID")
    assert_one_line_error(
        cli.invoke(app, ["search", "red", "circle", "--index", idx]), 'needs quotes: clipdex search "red circle"'
    )
    assert_one_line_error(cli.invoke(app, ["search", "dog", "--image", str(photos), "--index", idx]), "only one of")
    assert_one_line_error(cli.invoke(app, ["search", "--image", str(tmp_path / "no.png"), "--index", idx]), "not found")
    assert_one_line_error(cli.invoke(app, ["search", "   ", "--index", idx]), "empty")
    other = tmp_path / "other.json"
    other.write_text(tiny_model.config.read_text())
    r = cli.invoke(
        app, ["index", str(photos), "--index", idx, "--model", str(other), "--pretrained", str(tiny_model.weights)]
    )
    assert_one_line_error(r, "was built with tiny-clip")


def test_real_entry_point_prints_one_line(tmp_path):
    """Through the console entry point, third-party log lines must not join our one-line error."""
    make_images(tmp_path / "p", 2, seed=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "clipdex",
        "index",
        str(tmp_path / "p"),
        "--index",
        str(tmp_path / "idx"),
        "--model",
        "ViT-B-32",
        "--pretrained",
        "laion2b_s34b_b79k",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr
    assert "--pretrained /path/to/checkpoint" in proc.stderr


def test_eval_names_the_benchmarks_for_a_typo(cli, tmp_path):
    assert_one_line_error(
        cli.invoke(app, ["eval", "flickr", "--root", str(tmp_path)]),
        "neither a benchmark (flickr30k, coco)",
        "did you mean flickr30k?",
    )


def test_model_loading_errors_say_what_to_do(cli, tmp_path, photos, tiny_model):
    """A file that is not a checkpoint, weights that do not fit the architecture (with and without --model), and a
    pickle holding objects: one line each, naming the fix, never suggesting weights_only=False."""
    import json as _json

    import torch
    from corpus import TINY_CONFIG

    idx = str(tmp_path / "idx")
    jpg = next(photos.iterdir())
    wider = tmp_path / "wider.json"
    wider.write_text(_json.dumps({**TINY_CONFIG, "embed_dim": TINY_CONFIG["embed_dim"] * 2}))
    objects = tmp_path / "objects.pt"
    torch.save({"state": torch.nn.Linear(2, 2)}, objects)  # a module, not only tensors
    cases = [
        (["--model", str(tiny_model.config), "--pretrained", str(jpg)], ["is not a PyTorch or safetensors checkpoint"]),
        (
            ["--model", str(wider), "--pretrained", str(tiny_model.weights)],
            ["does not fit wider", "in the checkpoint but", "--model CONFIG.json"],
        ),
        (
            ["--pretrained", str(tiny_model.weights)],
            ["does not fit ViT-B-32", "match no open_clip architecture", "width 64", "--model CONFIG.json"],
        ),
        (["--model", str(tiny_model.config), "--pretrained", str(objects)], ["holds Python objects"]),
    ]
    for args, needles in cases:
        result = cli.invoke(app, ["index", str(photos), "--index", idx, *args])
        assert_one_line_error(result, *needles)
        assert "weights_only" not in result.stderr
        assert not (tmp_path / "idx").exists()


def test_a_checkpoint_without_model_names_its_architecture(cli, tmp_path, photos):
    """Weights of a built-in architecture given without --model (the default, ViT-B-32, does not fit): the shapes
    name the one to pass. Checked against open_clip's own models (built on the meta device: no weights made)."""
    import open_clip
    import torch

    from clipdex.retrieval.model.architecture import matching_architectures, shapes_of

    for name, expect in [("ViT-B-16", ["ViT-B-16", "ViT-B-16-quickgelu"]), ("ViT-B-32-256", ["ViT-B-32-256"])]:
        shapes = shapes_of(open_clip.create_model(name, device="meta").state_dict())
        assert shapes is not None
        assert matching_architectures(shapes) == expect
    assert shapes_of(open_clip.create_model("RN50", device="meta").state_dict()) is None  # not read: no guess

    # A ViT-B-16 checkpoint on disk: its tensors are as big as the real ones, but zeros compress to nothing in RAM
    model = open_clip.create_model("ViT-B-16", device="meta")
    weights = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in model.state_dict().items()}
    torch.save(weights, tmp_path / "b16.pt")
    result = cli.invoke(
        app, ["index", str(photos), "--index", str(tmp_path / "idx"), "--pretrained", str(tmp_path / "b16.pt")]
    )
    assert_one_line_error(result, "does not fit ViT-B-32", "shapes are those of ViT-B-16", "--model ViT-B-16")
    assert not (tmp_path / "idx").exists()


def test_the_first_run_without_network_fails_fast_and_says_how(cli, tmp_path, photos, monkeypatch):
    """The README's first command (a weights tag) on a machine that cannot reach the Hub: one full line saying to
    pass a local checkpoint, at once, not a minute of retries; nothing written."""
    import time

    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    t0 = time.monotonic()
    result = cli.invoke(app, ["index", str(photos), "--index", str(tmp_path / "idx")])
    assert time.monotonic() - t0 < 30
    assert_one_line_error(result, "cannot be reached", "--pretrained /path/to/checkpoint")
    assert "Retrying" not in result.stderr and "WARNING" not in result.stderr
    assert not (tmp_path / "idx").exists()


def test_piped_tables_are_plain_lines(cli, tmp_path, photos, tiny_model):
    """Piped (not a terminal), every table is tab-separated lines, header first: nothing boxed, wrapped or cut."""
    (photos / "broken.png").write_bytes(b"not a png")
    idx = str(tmp_path / "idx")
    summary = cli.invoke(app, ["index", str(photos), "--index", idx, *tiny_model.cli_args()])
    assert summary.exit_code == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert lines[0].split("\t") == ["added", "updated", "removed", "unchanged", "failed"]
    assert lines[1].split("\t") == ["4", "0", "0", "0", "1"]
    info = cli.invoke(app, ["info", "--index", idx, "--failed"])
    assert info.exit_code == 0, info.stderr
    assert "path or text\treason" in info.stdout and f"{photos / 'broken.png'}\t" in info.stdout
    for text in (summary.stdout, info.stdout):
        assert not set(text) & set("│┃─━┏┗╭╰"), text


def test_input_mistakes_are_answered_before_torch_loads(cli, tmp_path, photos, tiny_model):
    """Every command checks its arguments and index before importing torch or open_clip (seconds): a missing path,
    a photo as checkpoint, a photo folder as index, a typo for a benchmark, an earlier fine-tuning run."""
    code = (
        "import json, sys\nfrom clipdex.cli.main import main\n"
        "sys.argv = ['clipdex', *json.loads(sys.argv[1])]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "checkpoint.safetensors").write_bytes(b"x")
    jpg = str(next(photos.iterdir()))
    model = tiny_model.cli_args()
    mistakes = [
        ["index", str(tmp_path / "nope"), "--index", str(tmp_path / "i1"), *model],
        ["index", str(photos), "--index", str(photos), *model],
        ["index", str(photos), "--index", str(tmp_path / "i2"), "--model", str(tiny_model.config), "--pretrained", jpg],
        ["embed", str(tmp_path / "nope"), "--out", str(tmp_path / "emb"), *model],
        ["eval", "flickr", "--root", str(tmp_path)],
        ["finetune", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "ft"), *model],
        ["finetune", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "earlier"), *model],
        ["search", "red", "circle", "--index", str(tmp_path / "i1")],
        ["reindex", "--index", str(tmp_path / "i1"), "--pretrained", str(tiny_model.weights)],
        ["classify", "--index", str(tmp_path / "i1"), "--labels", "a,b"],
    ]
    index = tmp_path / "index"
    assert cli.invoke(app, ["index", str(photos), "--index", str(index), *model]).exit_code == 0
    mistakes += [
        ["reindex", "--index", str(index), "--pretrained", str(tmp_path / "nope.pt")],
        ["classify", "--index", str(index), "--eval", str(tmp_path / "nope")],
        ["classify", "--index", str(index), "--labels", "cat"],
    ]
    for argv in mistakes:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result == {"code": 2, "heavy": []}, (argv, result, done.stderr)
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_help_is_plain_for_every_command(cli):
    """--help of every command: readable metavars (`N`, `PATH`, the choices), never typer's `<bool>`, `<int range>`
    or `<list[Path]>`; the extras written as installed; every enumerated option lists its choices."""
    import re

    import typer.main

    group = typer.main.get_command(app)
    names = sorted(group.commands)  # type: ignore[attr-defined]
    assert {"index", "search", "finetune", "serve"} <= set(names)
    for name in [None, *names]:
        result = cli.invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.stdout)
        text = result.stdout
        assert not re.search(r"<(bool|str|int|float|path|list\[|[a-z]+ range)", text, re.IGNORECASE), (name, text)
        if name == "index":
            assert "clipdex[ray]" in text
            assert "auto|cpu|cuda" in text and "fp32|int8" in text
        if name == "finetune":
            method = next(line for line in text.splitlines() if "--method" in line)
            assert "lora" in method and "|" in method, method


def test_a_command_line_builds_only_the_command_it_names(cli):
    """`main` gives typer only the command a command line names (cli.main.app_for): its help, its errors and its
    parsing are the whole app's, and a command line naming none (or a misspelt one) gets them all."""
    import typer.main

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for name in names:
        lean = app_for([name, "--json"])
        assert [c.callback for c in lean.registered_commands] == [
            c.callback
            for c in app.registered_commands
            if typer.main.get_command_name(c.name or c.callback.__name__) == name  # type: ignore[union-attr]
        ]
        for argv in ([name, "--help"], [name, "--no-such-option"]):
            whole, alone = (cli.invoke(a, argv, env={"COLUMNS": "200"}) for a in (app, lean))
            assert (alone.exit_code, alone.output) == (whole.exit_code, whole.output), (argv, alone.output)
    for argv in ([], ["--help"], ["--version"], ["serach", "red"]):
        assert app_for(argv) is app
    assert len(app.registered_commands) == len(names)  # the app itself is left whole


def test_an_error_is_one_plain_line_when_rich_cannot_be_loaded(cli, tmp_path, monkeypatch):
    """rich is imported when something is first printed (cli.common.LazyConsole); when a failing disk keeps it from
    loading just as an error is to be said, the error is still its one line, plain."""
    from clipdex.cli import common

    def unloadable(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(common.LazyConsole, "console", property(unloadable))
    result = cli.invoke(app, ["search", "red", "--index", str(tmp_path / "nope"), "--no-server"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "nope") in lines[0], result.stderr
