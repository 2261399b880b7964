"""Daily habits: several caption files, failures in `index --json`, a default index, roots and last update."""

from __future__ import annotations

import json
from datetime import datetime

from conftest import run
from corpus import make_images


def test_several_caption_files_failures_in_json_default_index_and_info(cli, tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_images(photos, 4, seed=111)
    (photos / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "a.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "b.txt").write_text("a green cross\n")
    index = tmp_path / "idx"
    out = json.loads(
        run(
            cli,
            "index",
            photos,
            "--texts",
            tmp_path / "a.txt",
            "--texts",
            tmp_path / "b.txt",
            "--index",
            index,
            "--json",
            *tiny_model.cli_args(),
        )
    )
    assert (out["added"], out["failed"]) == (4 + 3, 1)
    assert out["failures"] == [{"path": str(photos / "broken.png"), "error": out["failures"][0]["error"]}]
    assert "not a readable image" in out["failures"][0]["error"] and "0x" not in out["failures"][0]["error"]
    texts = {
        r["text"]
        for r in json.loads(run(cli, "search", "a shape", "--index", index, "--target", "texts", "--json"))["results"]
    }
    assert texts == {"a red circle", "a blue square", "a green cross"}

    from clipdex.cli.main import app

    by_env = cli.invoke(app, ["search", "a red circle", "--json", "-k", 2], env={"CLIPDEX_INDEX": str(index)})
    assert by_env.exit_code == 0, by_env.stderr
    assert json.loads(by_env.stdout) == json.loads(
        run(cli, "search", "a red circle", "--json", "-k", 2, "--index", index)
    )

    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["roots"] == [str(photos)]
    updated = datetime.fromisoformat(info["updated"])
    assert abs(updated.timestamp() - datetime.now().timestamp()) < 600
    shown = run(cli, "info", "--index", index)
    assert "last update" in shown and str(photos) in shown
