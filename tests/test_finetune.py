"""Fine-tuning on generated pairs of a domain the tiny model never saw; reindex with the result.

The starting model is the session's tiny model, trained on coloured circles, squares, triangles and crosses;
the pairs show stars, hexagons, diamonds and rings in other colours, captioned in catalogue wording.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyModel, run, search_json
from corpus import make_domain_pairs
from safetensors.torch import load_file
from test_errors import assert_one_line_error

from clipdex.cli.main import app
from clipdex.retrieval.evaluation.datasets import RetrievalDataset
from clipdex.retrieval.finetune.pairs import epoch_batches, split_by_image

REPO = Path(__file__).parents[1]
LR = {"full": "1e-3", "last-n": "2e-3", "lora": "3e-3", "lit": "1e-3"}


@pytest.fixture(scope="module")
def domain(tmp_path_factory) -> tuple[Path, Path]:
    """(training pairs, held-out test pairs): different images, the same kind of domain."""
    root = tmp_path_factory.mktemp("domain")
    return make_domain_pairs(root, 160, seed=1), make_domain_pairs(root, 60, seed=2, name="test.csv")


def finetune_json(cli, pairs: Path, out: Path, model: TinyModel, *args: str) -> dict:
    return json.loads(
        run(
            cli,
            "finetune",
            pairs,
            "--out",
            out,
            *model.cli_args(),
            "--batch-size",
            "32",
            "--workers",
            "0",
            "--json",
            *args,
        )
    )


def eval_json(cli, pairs: Path, model: TinyModel, weights: Path) -> dict:
    return json.loads(
        run(cli, "eval", pairs, "--model", model.config, "--pretrained", weights, "--workers", "0", "--json")
    )


@pytest.mark.parametrize("method", ["full", "last-n", "lora", "lit"])
def test_each_method_raises_recall_on_a_new_domain(cli, tmp_path, tiny_model, domain, method):
    pairs, test = domain
    extra = ["--layers", "1"] if method == "last-n" else []
    t0 = time.monotonic()
    out = finetune_json(
        cli, pairs, tmp_path / "ft", tiny_model, "--method", method, "--epochs", "8", "--lr", LR[method], *extra
    )
    assert time.monotonic() - t0 < 60
    before, after = out["before"]["text_to_image"]["R@5"], out["after"]["text_to_image"]["R@5"]
    assert after >= before + 0.2, (before, after)
    assert out["method"] == method and out["train_pairs"] + out["val_pairs"] == 320
    # the checkpoint loads with the same --model everywhere: a held-out test set measured by `clipdex eval`
    base = eval_json(cli, test, tiny_model, tiny_model.weights)["text_to_image"]["R@5"]
    tuned = eval_json(cli, test, tiny_model, Path(out["checkpoint"]))["text_to_image"]["R@5"]
    assert tuned >= base + 0.2, (base, tuned)
    folder = tmp_path / "ft"
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val" in r] == list(range(9))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in log if "loss" in r)
    report = json.loads((folder / "report.json").read_text())
    assert report["after"] == out["after"] and report["trainable_params"] > 0
    assert (folder / "training.png").stat().st_size > 10_000
    assert not (folder / "state").exists()  # the resume state goes once the run is done


def test_lit_leaves_the_image_tower_bit_for_bit(cli, tmp_path, tiny_model, domain):
    out = finetune_json(cli, domain[0], tmp_path / "ft", tiny_model, "--method", "lit", "--epochs", "2", "--lr", "1e-3")
    start = torch.load(tiny_model.weights, weights_only=True)
    tuned = load_file(out["checkpoint"])
    visual = [k for k in start if k.startswith("visual.")]
    assert visual and all(torch.equal(start[k], tuned[k]) for k in visual)
    assert any(not torch.equal(start[k], tuned[k]) for k in start if not k.startswith("visual."))


def test_lora_trains_only_adapters_and_merges_exactly(cli, tmp_path, tiny_model, domain, reference):
    import open_clip
    from peft import PeftModel

    out = finetune_json(
        cli, domain[0], tmp_path / "ft", tiny_model, "--method", "lora", "--rank", "4", "--epochs", "2", "--lr", "3e-3"
    )
    adapter = load_file(str(tmp_path / "ft" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert out["trainable_params"] == sum(v.numel() for v in adapter.values())
    assert out["adapter_bytes"] < out["checkpoint_bytes"] / 10
    base, _, _ = open_clip.create_model_and_transforms(tiny_model.name, pretrained=str(tiny_model.weights))
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "ft" / "adapter")).eval()
    merged, _, _ = open_clip.create_model_and_transforms(tiny_model.name, pretrained=out["checkpoint"])
    merged.eval()
    tokens = open_clip.get_tokenizer(tiny_model.name)(["teal star on pink", "a navy ring"])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        inner = with_adapter.base_model.model
        torch.testing.assert_close(merged.encode_text(tokens), inner.encode_text(tokens), atol=1e-5, rtol=0)
        torch.testing.assert_close(merged.encode_image(pixels), inner.encode_image(pixels), atol=1e-5, rtol=0)
    start = torch.load(tiny_model.weights, weights_only=True)
    changed = [k for k, v in load_file(out["checkpoint"]).items() if not torch.equal(v, start[k])]
    assert changed and all(
        k.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")) for k in changed
    )


def test_validation_never_shares_an_image_with_training(cli, tmp_path, tiny_model, domain):
    rng = np.random.default_rng(0)
    for seed in range(20):
        n = int(rng.integers(2, 60))
        ds = RetrievalDataset("x", "x", "x", [Path(f"/i/{i}") for i in range(n)], [[f"c{i}"] for i in range(n)])
        try:
            train, val = split_by_image(ds, float(rng.uniform(0.05, 0.6)), seed)
        except Exception:
            continue
        assert not set(train.images) & set(val.images) and len(train.images) + len(val.images) == n
    # a validation file that shares images with the training pairs: they leave training, with a note
    val = domain[0].parent / "val-overlap.csv"  # beside the pairs: image paths are relative to the file
    lines = domain[0].read_text().splitlines()
    val.write_text("\n".join(lines[:21]) + "\n")
    result = cli.invoke(
        app,
        [
            "finetune",
            str(domain[0]),
            "--val",
            str(val),
            "--out",
            str(tmp_path / "ft"),
            *tiny_model.cli_args(),
            "--epochs",
            "1",
            "--workers",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "validation images are also in the training pairs" in result.stderr
    out = json.loads(result.stdout)
    assert out["val_pairs"] == 20 and out["train_pairs"] == 320 - 20


def test_batches_hold_one_caption_per_image_and_no_repeated_text():
    captions = [[f"caption {i % 7}", f"other {i}"] for i in range(50)]  # many images share captions
    ds = RetrievalDataset("x", "x", "x", [Path(f"/i/{i}") for i in range(50)], captions)
    for seed in range(10):
        batches = epoch_batches(ds, 8, np.random.default_rng(seed))
        seen = [i for b in batches for i, _ in b]
        assert len(seen) == len(set(seen))  # every image at most once an epoch, so once per batch
        for b in batches:
            assert len({t for _, t in b}) == len(b) and 2 <= len(b) <= 8


def test_hard_negative_batches_group_similar_images_and_keep_the_rules():
    """--hard-negatives: each image once an epoch; with images in tight clusters, each group of G is one cluster
    (the anchor's nearest, against a brute-force check of similarity); the batch rules still hold."""
    from clipdex.retrieval.finetune.pairs import hard_negative_order, nearest_images

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    labels = np.repeat(np.arange(6), 8)  # 6 clusters of 8 images
    emb = centres[labels] + 0.01 * rng.normal(size=(48, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    neighbours = nearest_images(emb, 4)
    sims = emb @ emb.T
    for i in range(48):  # brute force: nobody nearer than the nearest listed
        others = np.delete(np.arange(48), i)
        assert sims[i, neighbours[i, 0]] == sims[i, others].max()
    for seed in range(5):
        order = hard_negative_order(neighbours, 4, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(48))
        groups = order.reshape(12, 4)  # 8 per cluster: always two full groups of 4 each
        assert all(len(set(labels[g])) == 1 for g in groups)
    captions = [[f"caption {i % 7}", f"other {i}"] for i in range(48)]
    ds = RetrievalDataset("x", "x", "x", [Path(f"/i/{i}") for i in range(48)], captions)
    for seed in range(5):
        batches = epoch_batches(ds, 8, np.random.default_rng(seed), neighbours, 4)
        seen = [i for b in batches for i, _ in b]
        assert len(seen) == len(set(seen))
        for b in batches:
            assert len({t for _, t in b}) == len(b) and 2 <= len(b) <= 8


def test_finetune_with_hard_negatives_runs_and_rerank_refuses_it(cli, tmp_path, tiny_model):
    from corpus import make_domain_pairs

    from clipdex.cli.main import app

    pairs = make_domain_pairs(tmp_path / "pairs", 40, seed=5)
    args = ["finetune", str(pairs), *tiny_model.cli_args(), "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--hard-negatives", "4", "--json"]  # fmt: skip
    result = cli.invoke(app, [*args, "--out", str(tmp_path / "hard")])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["epochs"] == 1
    refused = cli.invoke(app, [*args, "--method", "rerank", "--out", str(tmp_path / "rr")])
    assert refused.exit_code == 2 and "--hard-negatives" in refused.stderr


def test_feature_cached_accumulation_gives_the_full_batch_gradient(tiny_model):
    import open_clip

    from clipdex.retrieval.finetune.loop import Trainer

    def one_step(accum: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms(tiny_model.name, pretrained=str(tiny_model.weights))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself (Adam's is its sign)
        trainer = Trainer(
            model,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
            device=torch.device("cpu"),
            accum_freq=accum,
        )
        g = torch.Generator().manual_seed(1)
        pixels = torch.randn(16, 3, 32, 32, generator=g)
        tokens = open_clip.get_tokenizer(tiny_model.name)([f"a thing number {i}" for i in range(16)])
        batches = [(pixels, tokens)] if accum == 1 else [(pixels[:8], tokens[:8]), (pixels[8:], tokens[8:])]
        trainer.epoch(1, batches, lambda step: None)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    whole, accumulated = one_step(1), one_step(2)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)


def test_wise_interpolates_and_keep_shows_forgetting(cli, tmp_path, tiny_model, domain):
    start = torch.load(tiny_model.weights, weights_only=True)
    zero = finetune_json(cli, domain[0], tmp_path / "w0", tiny_model, "--epochs", "1", "--lr", "1e-3", "--wise", "0")
    assert all(torch.equal(v, start[k]) for k, v in load_file(zero["checkpoint"]).items())
    keep = tmp_path / "general.csv"
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from corpus import make_images

    items = make_images(tmp_path / "general", 20, seed=3)
    keep.write_text(
        "image,caption\n"
        + "".join(
            f"general/{p.name},a {s.size} {s.colour} {s.shape} on a {s.background} background\n" for p, s in items
        )
    )
    full = finetune_json(cli, domain[0], tmp_path / "w1", tiny_model, "--epochs", "2", "--lr", "1e-3", "--keep", keep)
    half = finetune_json(
        cli, domain[0], tmp_path / "wh", tiny_model, "--epochs", "2", "--lr", "1e-3", "--keep", keep, "--wise", "0.5"
    )
    a, b = load_file(full["checkpoint"]), load_file(half["checkpoint"])
    for k in ("text_projection", "visual.proj"):
        torch.testing.assert_close(b[k], 0.5 * start[k] + 0.5 * a[k], atol=1e-6, rtol=0)
    assert set(full["keep"]) == {"before", "after"} and full["keep"]["before"]["text_to_image"]["R@5"] > 0


def _whole_and_killed(cmd: Callable[..., list[str]], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run `cmd(tmp_path / "whole")` to the end, and `cmd(tmp_path / "killed")` until its first epoch's resume state
    is saved, then SIGKILL it; (the whole run, the killed run's state file)."""
    whole = subprocess.run(cmd(tmp_path / "whole"), cwd=REPO, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(cmd(tmp_path / "killed"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "state" / "resume.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run ended before its first epoch was saved"
    return whole, state


def test_resume_after_sigkill_finishes_where_an_uninterrupted_run_does(tmp_path, tiny_model, domain):
    def cmd(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "clipdex", "finetune", str(domain[0]), "--out", str(out), *tiny_model.cli_args(),
            "--epochs", "4", "--lr", "1e-3", "--batch-size", "32", "--workers", "0", "--seed", "7", "--json", *extra,
        ]  # fmt: skip

    whole, _ = _whole_and_killed(cmd, tmp_path)
    again = subprocess.run(cmd(tmp_path / "killed"), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # an unfinished run is never overwritten
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(whole.stdout), json.loads(resumed.stdout)
    assert a["after"] == b["after"] and a["best_epoch"] == b["best_epoch"]
    wa, wb = load_file(a["checkpoint"]), load_file(b["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # deterministic on CPU, resumed or not


def test_a_rerank_run_killed_mid_way_resumes_to_the_same_head(tmp_path, tiny_model, domain):
    """`--method rerank --resume`: the head, its validation recall and best epoch equal an uninterrupted run's."""

    def cmd(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "clipdex", "finetune", str(domain[0]), "--method", "rerank", "--out", str(out),
            *tiny_model.cli_args(), "--epochs", "5", "--batch-size", "16", "--workers", "0", "--seed", "3", "--json",
            *extra,
        ]  # fmt: skip

    whole, state = _whole_and_killed(cmd, tmp_path)
    resumed = subprocess.run(cmd(tmp_path / "killed", "--resume"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(whole.stdout), json.loads(resumed.stdout)
    assert "resuming after epoch" in resumed.stderr
    assert a["after"] == b["after"] and a["best_epoch"] == b["best_epoch"] and b["epochs"] == 5
    wa, wb = load_file(a["head"]), load_file(b["head"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # deterministic on CPU, resumed or not
    assert not state.parent.exists()


def test_bad_input_gets_one_line(cli, tmp_path, tiny_model, domain):
    args = [*tiny_model.cli_args(), "--workers", "0", "--epochs", "1"]
    broken = tmp_path / "broken.csv"
    images = tmp_path / "img"
    images.mkdir()
    (images / "bad.png").write_bytes(b"not a png")
    lines = domain[0].read_text().splitlines()
    rel = lambda line: str(domain[0].parent / line.split(",")[0]) + "," + line.split(",", 1)[1]  # noqa: E731
    broken.write_text(
        "image,caption\n"
        + "\n".join(rel(x) for x in lines[1:41])
        + f"\n{images}/bad.png,a broken one\n{images}/gone.png,a missing one\n"
    )
    result = cli.invoke(app, ["finetune", str(broken), "--out", str(tmp_path / "a"), *args, "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert {s["what"] for s in out["skipped"]} == {str(images / "bad.png"), str(images / "gone.png")}
    assert "batch shrinks to 18" in result.stderr  # 20 images, 2 held out, fewer than the default batch of 64
    few = tmp_path / "few.csv"
    few.write_text("image,caption\n" + rel(lines[1]) + "\n")
    assert_one_line_error(cli.invoke(app, ["finetune", str(few), "--out", str(tmp_path / "b"), *args]), "too few")
    dance = cli.invoke(app, ["finetune", str(broken), "--out", str(tmp_path / "c"), *args, "--method", "dance"])
    assert dance.exit_code == 2 and "'dance' is not one of" in dance.stderr and "'last-n'" in dance.stderr
    assert_one_line_error(
        cli.invoke(
            app, ["finetune", str(broken), "--out", str(tmp_path / "d"), *args, "--method", "last-n", "--layers", "9"]
        ),
        "more than the model has",
    )
    not_clip = tmp_path / "resnet.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, not_clip)
    result = cli.invoke(
        app,
        [
            "finetune",
            str(broken),
            "--out",
            str(tmp_path / "e"),
            "--model",
            str(tiny_model.config),
            "--pretrained",
            str(not_clip),
        ],
    )
    assert_one_line_error(result, "does not fit", "--model")
    assert_one_line_error(cli.invoke(app, ["finetune", "--out", str(tmp_path / "f"), *args]), "pairs file or --dataset")


def test_reindex_with_a_lit_checkpoint_encodes_no_image(cli, tmp_path, tiny_model, domain, monkeypatch):
    import open_clip

    from clipdex.retrieval.model.encoder import Encoder

    pairs = domain[0]
    index = tmp_path / "idx"
    run(cli, "index", pairs.parent / "images", "--texts", pairs, "--index", index, *tiny_model.cli_args())
    before = {
        r["path"]: r["score"]
        for r in search_json(cli, index, "--image", next((pairs.parent / "images").iterdir()), "-k", "500")["results"]
    }
    out = finetune_json(cli, pairs, tmp_path / "ft", tiny_model, "--method", "lit", "--epochs", "2", "--lr", "1e-3")

    def no_images(*a, **k):
        raise AssertionError("an image was encoded")

    monkeypatch.setattr(Encoder, "encode_images", no_images)
    summary = json.loads(run(cli, "reindex", "--index", index, "--pretrained", out["checkpoint"], "--json"))
    assert summary["images_kept"] and summary["images"] == 0 and summary["texts"] == 320
    monkeypatch.undo()
    after = {
        r["path"]: r["score"]
        for r in search_json(cli, index, "--image", next((pairs.parent / "images").iterdir()), "-k", "500")["results"]
    }
    assert after == pytest.approx(before, abs=1e-6)  # image vectors untouched
    # texts now come from the tuned model: text→image scores equal brute force with it
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model.name, pretrained=out["checkpoint"])
    tokens = open_clip.get_tokenizer(tiny_model.name)(["teal star item on pink"])
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.eval().encode_text(tokens), dim=-1)[0].numpy()
    hits = search_json(cli, index, "teal star item on pink", "-k", "5")["results"]
    from PIL import Image

    for h in hits:
        with torch.no_grad():
            v = torch.nn.functional.normalize(
                model.encode_image(preprocess(Image.open(h["path"]).convert("RGB"))[None]), dim=-1
            )[0].numpy()
        assert h["score"] == pytest.approx(float(v @ q), abs=2e-5)
    info = json.loads(run(cli, "info", "--index", index, "--json"))
    assert info["model"]["pretrained"] == str(Path(out["checkpoint"]).resolve())


def test_reindex_is_crash_safe_and_blocks_other_writers_until_done(cli, tmp_path, tiny_model, domain, monkeypatch):
    from clipdex.retrieval.maintain.check import check_index
    from clipdex.retrieval.store.writer import IndexWriter

    pairs = domain[0]
    index = tmp_path / "idx"
    run(
        cli,
        "index",
        pairs.parent / "images",
        "--texts",
        pairs,
        "--index",
        index,
        *tiny_model.cli_args(),
        "--batch-size",
        "32",
    )
    old = search_json(cli, index, "a hexagon", "-k", "10")["results"]
    out = finetune_json(cli, pairs, tmp_path / "ft", tiny_model, "--method", "full", "--epochs", "2", "--lr", "1e-3")
    real = IndexWriter.stage_vectors
    calls = []

    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(IndexWriter, "stage_vectors", dying)
    args = ["reindex", "--index", str(index), "--pretrained", out["checkpoint"], "--batch-size", "32", "--json"]
    assert cli.invoke(app, args).exit_code != 0
    monkeypatch.setattr(IndexWriter, "stage_vectors", real)
    assert search_json(cli, index, "a hexagon", "-k", "10")["results"] == old  # the old state still answers
    assert check_index(index).ok
    result = cli.invoke(app, ["index", str(pairs.parent / "images"), "--index", str(index)])
    assert_one_line_error(result, "unfinished `clipdex reindex`", "--pretrained")
    summary = json.loads(run(cli, *args))
    assert (
        summary["resumed"]
        and not summary["images_kept"]
        and summary["images"] + summary["texts"] < len(list((pairs.parent / "images").iterdir())) + 320
    )
    new = search_json(cli, index, "a hexagon", "-k", "10")["results"]
    assert new != old and check_index(index).ok
    on_disk = len(list((pairs.parent / "images").iterdir()))
    assert json.loads(run(cli, "index", pairs.parent / "images", "--index", index, "--json"))["unchanged"] == on_disk


def test_an_earlier_run_in_out_is_kept_unless_overwrite(cli, tmp_path, tiny_model, domain):
    """A finished run's folder is refused as --out before anything loads; --overwrite replaces it."""
    import time as _time

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"an earlier run")
    args = ["finetune", str(domain[0]), "--out", str(out), *tiny_model.cli_args(), "--workers", "0", "--epochs", "1"]
    t0 = _time.monotonic()
    assert_one_line_error(cli.invoke(app, args), "holds an earlier run's checkpoint", "--overwrite")
    assert _time.monotonic() - t0 < 5 and (out / "checkpoint.safetensors").read_bytes() == b"an earlier run"
    result = cli.invoke(app, [*args, "--overwrite", "--json"])
    assert result.exit_code == 0, result.stderr
    assert (out / "checkpoint.safetensors").read_bytes() != b"an earlier run"
