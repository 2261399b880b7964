"""The web page in a real browser: Debian's headless Chromium driven by Playwright, against a served index.

It types a query and sees the expected thumbnails, drops an image, clicks "Similar", switches to texts, uses the
keyboard, sees an error state, and saves screenshots. Every request the page makes must go to the server itself.
"""

from __future__ import annotations

import base64
import os
import shutil

import pytest
from conftest import run, serving
from corpus import make_captioned_library
from typer.testing import CliRunner

from clipdex.retrieval.search.filters import Filter, parse_date
from clipdex.retrieval.search.query import Query
from clipdex.retrieval.search.searcher import Searcher, Target
from clipdex.retrieval.serve.app import ServeConfig, create_app

K = 48  # what the page asks for
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root and offline: no sandbox, and none of Chromium's own calls home (refused here, many at a time)
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it with apt-get")
        pytest.skip("no chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("browsed")
    made = make_captioned_library(root, 24, 12, seed=91)
    run(
        CliRunner(),
        "index",
        root / "photos",
        "--texts",
        root / "captions.csv",
        "--index",
        root / "idx",
        *tiny_model.cli_args(),
    )
    searcher = Searcher(root / "idx")
    with serving(create_app(searcher, ServeConfig(root / "idx"))) as base:
        yield base, searcher, made


def image_id(searcher: Searcher, path) -> int:
    return next(h.id for h in searcher.search_image(path, k=3) if h.path == str(path))


def _shown_ids(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")]


def _wait_for(page, ids: list[int]) -> None:
    page.wait_for_function(
        "want => JSON.stringify([...document.querySelectorAll('#results .card')].map(c => Number(c.dataset.id))) === want",
        arg=str(ids).replace(" ", ""),
        timeout=15_000,
    )


def test_search_drop_similar_texts_keyboard_and_errors(browser, served, tmp_path):
    base, searcher, made = served
    # the test's own waits evaluate strings, which the page's CSP forbids: test_the_page_runs_under_its_csp checks it
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(base + "/")
    assert page.locator("#empty").is_visible()
    page.wait_for_function("document.querySelector('#index-summary').textContent.includes('24 images')")

    # typing: results as you stop typing, the ranking Searcher gives, thumbnails that load
    page.fill("#q", "a red circle")
    want = [h.id for h in searcher.search_text("a red circle", k=K)]
    _wait_for(page, want)
    page.wait_for_function(
        "[...document.querySelectorAll('#results .card img')].slice(0, 10).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert (
        page.locator("#results .card").first.locator(".score").inner_text()
        == f"{searcher.search_text('a red circle', k=1)[0].score:.3f}"
    )
    assert "q=a+red+circle" in page.url  # the query is in the address, so a reload keeps it
    page.screenshot(path=str(tmp_path / "results.png"))

    # refining: "but not" and a folder, as the API's subtract and in
    page.click("#refine summary")
    page.fill("#subtract", "circle")
    _wait_for(page, [h.id for h in searcher.search(Query.build(text="a red circle", subtract=["circle"]), k=K)])
    page.fill("#in", str(made[0][0].parent))
    page.fill("#after", "2000-01-01")
    where = Filter(in_folder=made[0][0].parent, after=parse_date("2000-01-01", option="after"))
    _wait_for(
        page, [h.id for h in searcher.search(Query.build(text="a red circle", subtract=["circle"]), k=K, where=where)]
    )
    page.screenshot(path=str(tmp_path / "refined.png"))
    for name in ("#subtract", "#in", "#after"):
        page.fill(name, "")
    _wait_for(page, want)

    # dropping an image: a DataTransfer holding the file, dropped on the page
    image = made[3][0]
    payload = base64.b64encode(image.read_bytes()).decode()
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: 'image/png'}));
            window.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt}));
            window.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, cancelable: true}));
        }""",
        [payload, image.name],
    )
    # the dropped file is an indexed image: it is left out, as `clipdex search --image` leaves it out
    _wait_for(page, [h.id for h in searcher.search(Query.build(data=image.read_bytes()), k=K)])
    assert image_id(searcher, image) not in _shown_ids(page)
    assert page.locator("#query-chip").is_visible() and image.name in page.inner_text("#query-label")
    page.screenshot(path=str(tmp_path / "dropped.png"))

    # the picture button: a file chooser
    page.set_input_files("#file", str(made[5][0]))
    _wait_for(page, [h.id for h in searcher.search(Query.build(data=made[5][0].read_bytes()), k=K)])

    # "Similar" on a result
    first = _shown_ids(page)[1]
    page.locator("#results .card").nth(1).locator(".similar").click()
    _wait_for(page, [h.id for h in searcher.similar(first, k=K)])
    assert first not in _shown_ids(page)
    page.screenshot(path=str(tmp_path / "similar.png"))

    # the images/texts switch
    page.fill("#q", "a blue square")
    _wait_for(page, [h.id for h in searcher.search_text("a blue square", k=K)])
    page.click("#target-texts")
    _wait_for(page, [h.id for h in searcher.search_text("a blue square", k=K, target=Target.TEXTS)])
    assert page.locator("#results .card.text").count() == 12
    page.screenshot(path=str(tmp_path / "texts.png"))
    page.click("#target-images")

    # by keyboard alone: "/" focuses the box, Tab reaches the results, Enter on a card searches similar ones
    page.locator("body").click(position={"x": 5, "y": 850})
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.press("Control+A")
    page.keyboard.type("a green triangle")
    want = [h.id for h in searcher.search_text("a green triangle", k=K)]
    _wait_for(page, want)
    page.locator("#results .card").first.focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.id") == str(want[1])
    page.keyboard.press("Enter")
    _wait_for(page, [h.id for h in searcher.similar(want[1], k=K)])

    # an empty result and an error, each said in words
    page.route(
        "**/api/search?*",
        lambda route: route.fulfill(
            status=503, content_type="application/json", body='{"error": "the index is being repaired"}'
        ),
    )
    page.fill("#q", "anything at all")
    page.wait_for_selector("#status.error")
    assert "the index is being repaired" in page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "error.png"))
    page.unroute("**/api/search?*")
    page.keyboard.press("Escape")
    assert page.locator("#empty").is_visible()

    outside = [u for u in requests if not u.startswith(base) and not u.startswith(("blob:", "data:"))]
    assert outside == []
    for name in ("results", "refined", "dropped", "similar", "texts", "error"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    page.close()


def test_the_page_runs_under_its_csp(browser, served, tmp_path):
    """Searching by words and by a picked image, with the page's Content-Security-Policy in force: results and
    thumbnails load, and the console reports nothing the policy blocked."""
    base, _, made = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    response = page.goto(base + "/")
    assert response is not None and "default-src 'self'" in response.headers["content-security-policy"]
    page.fill("#q", "a red circle")
    page.locator("#results .card img").first.wait_for()
    page.set_input_files("#file", str(made[0][0]))  # a picked image: its preview is a blob: URL
    page.locator("#query-chip img").first.wait_for()
    page.locator("#results .card img").first.wait_for()
    page.wait_for_timeout(500)  # let the thumbnails load
    blocked = [m for m in console if "Content Security Policy" in m or "Refused to" in m]
    assert blocked == [], blocked
    page.close()


def test_the_rerank_toggle_and_sort_reorder_as_the_library_does(browser, tmp_path, tiny_model):
    """An index with a re-ranking head: the page offers the toggle (hidden without a head), and with it on shows
    the library's re-ranked order, each re-scored result with both scores; the sort control orders as --sort."""
    root = tmp_path / "lib"
    make_captioned_library(root, 24, 12, seed=93)
    cli = CliRunner()
    run(cli, "index", root / "photos", "--texts", root / "captions.csv", "--index", root / "idx",
        *tiny_model.cli_args())  # fmt: skip
    searcher = Searcher(root / "idx")
    with serving(create_app(searcher, ServeConfig(root / "idx"))) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        page.goto(base + "/")
        page.click("#refine summary")
        page.wait_for_function("document.querySelector('#index-summary').textContent.includes('24 images')")
        assert page.locator("#after").is_visible() and not page.locator("#rerank-toggle").is_visible()  # no head yet
        run(cli, "finetune", root / "captions.csv", "--method", "rerank", "--index", root / "idx", "--out",
            root / "head", "--epochs", "2", "--batch-size", "8", "--workers", "0")  # fmt: skip
        page.reload()
        page.click("#refine summary")
        page.wait_for_selector("#rerank-toggle", state="visible")
        page.fill("#q", "a green square")
        _wait_for(page, [h.id for h in searcher.search_text("a green square", k=K)])
        page.check("#rerank")
        want = searcher.search(Query.build(text="a green square"), k=K, rerank=16)
        _wait_for(page, [h.id for h in want])
        first = page.locator("#results .card").first.locator(".score").inner_text()
        assert first == f"{want[0].score:.3f} · {want[0].rerank:.2f}"
        page.uncheck("#rerank")
        _wait_for(page, [h.id for h in searcher.search_text("a green square", k=K)])
        for sort in ("-date", "name"):  # the sort control: the same results, in the library's order
            page.select_option("#sort", sort)
            _wait_for(page, [h.id for h in searcher.search(Query.build(text="a green square"), k=K, sort=sort)])
        page.close()


def test_a_watched_library_shows_indexing_and_new_results_without_a_reload(browser, tmp_path, tiny_model):
    """Under `serve --watch` the page says it is watching; photos copied into the folder appear in the open
    results (the library's order) without a reload."""
    from corpus import make_images

    from clipdex.cli.watch import watch_config
    from clipdex.indexer.watch import Watcher

    photos, index = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 6, seed=94)
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    config = watch_config(index, None, workers=0)
    config.settle_s, config.quiet_ms = 0.5, 150
    watcher = Watcher(config)
    watcher.start()
    searcher = Searcher(index)
    try:
        with serving(create_app(searcher, ServeConfig(index, watch=watcher.status.to_json))) as base:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
            page.goto(base + "/?q=a+red+circle")
            page.wait_for_function("document.querySelector('#watch-state').textContent.includes('watching')")
            _wait_for(page, [h.id for h in searcher.search_text("a red circle", k=K)])
            make_images(photos, 5, seed=95, start=20)
            page.wait_for_function("document.querySelectorAll('#results .card').length === 11", timeout=30_000)
            searcher.refresh()
            _wait_for(page, [h.id for h in searcher.search_text("a red circle", k=K)])
            page.close()
    finally:
        watcher.stop.set()


def test_the_all_relevant_toggle_shows_the_librarys_relevant_set(browser, served):
    """ "all relevant" under Refine: the page shows what `search --relevant` returns, not the best 48."""
    base, searcher, _ = served
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page.goto(base + "/?q=a+red+circle")
    _wait_for(page, [h.id for h in searcher.search_text("a red circle", k=K)])
    page.click("#refine summary")
    page.check("#relevant")
    _wait_for(page, [h.id for h in searcher.search(Query.build(text="a red circle"), relevant=True)])
    page.uncheck("#relevant")
    _wait_for(page, [h.id for h in searcher.search_text("a red circle", k=K)])
    page.close()


def test_all_relevant_newest_first_is_grouped_by_month(browser, tmp_path, tiny_model):
    """ "all relevant" with "newest first": the library's relevant set in its date order, under one heading per
    month (the files' dates are spread over several months)."""
    import datetime as dt

    from corpus import make_images

    photos, index = tmp_path / "photos", tmp_path / "idx"
    made = make_images(photos, 24, seed=96)
    for i, (path, _) in enumerate(made):
        when = dt.datetime(2023, 1 + i % 5, 3 + i, 12, tzinfo=dt.UTC).timestamp()
        os.utime(path, (when, when))
    run(CliRunner(), "index", photos, "--index", index, *tiny_model.cli_args())
    searcher = Searcher(index)
    want = searcher.search(Query.build(text="a red circle"), relevant=True, sort="-date")
    months = list(dict.fromkeys(dt.datetime.fromtimestamp(h.date, dt.UTC).strftime("%B %Y") for h in want))
    assert len(months) > 1
    with serving(create_app(searcher, ServeConfig(index))) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True, locale="en-US")
        page.goto(base + "/?q=a+red+circle")
        page.click("#refine summary")
        page.check("#relevant")
        page.select_option("#sort", "-date")
        _wait_for(page, [h.id for h in want])
        assert page.eval_on_selector_all("#results .month", "hs => hs.map(h => h.textContent)") == months
        page.close()


def test_words_in_photos_are_shown_and_the_match_control_ranks_as_the_library_does(browser, tmp_path, tiny_model):
    """An index that reads words (`index --ocr`): a word typed finds its photo (hybrid by default), each card shows
    the words read in it, and "match: words / meaning" give the library's lexical and semantic rankings."""
    from corpus import make_images, make_word_images

    photos, index = tmp_path / "photos", tmp_path / "idx"
    made = make_word_images(photos, 6, seed=97)
    make_images(photos, 6, seed=98)
    run(CliRunner(), "index", photos, "--index", index, "--ocr", *tiny_model.cli_args())
    searcher = Searcher(index)
    path, text = made[0]
    word = text.split()[0].lower()
    with serving(create_app(searcher, ServeConfig(index))) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        page.goto(base + "/")
        page.fill("#q", word)
        hybrid = searcher.search(Query.build(text=word), k=K)
        assert str(path) in [h.path for h in hybrid[:3]]
        _wait_for(page, [h.id for h in hybrid])
        card = page.locator(f"#results .card[data-id='{hybrid[0].id}']")
        assert word in card.locator(".words").inner_text().lower()
        page.click("#refine summary")
        page.select_option("#mode", "lexical")
        lexical = searcher.search(Query.build(text=word), k=K, mode="lexical")
        _wait_for(page, [h.id for h in lexical])
        assert page.locator("#results .card").first.locator(".score").inner_text() == f"words {lexical[0].score:.2f}"
        page.select_option("#mode", "semantic")
        _wait_for(page, [h.id for h in searcher.search(Query.build(text=word), k=K, mode="semantic")])
        page.close()
