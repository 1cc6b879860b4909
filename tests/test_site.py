"""The rendered course site, built with the network cut, checked in a real browser (Debian Chromium via Playwright)."""
import functools
import http.server
import json
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ARTIFACTS, ROOT, Visit
from dlopt_labs.course.chapters import written_chapters

CLI = str(Path(sys.executable).parent / "dlopt-labs")


def _offline(cmd):
    """The command inside a new network namespace with only loopback up, when this machine allows it (root)."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
    if probe.returncode: return cmd, False
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "offline", *cmd], True


@pytest.fixture(scope="session")
def site(notebook_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "_site"
    cmd, offline = _offline([CLI, "site", "--mode", "smoke", "--runs", str(notebook_runs["out"]), "--out", str(out)])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(path=out, offline=offline, seconds=time.perf_counter() - t0, runs=notebook_runs)


@pytest.fixture(scope="session")
def server(site):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    handler = functools.partial(Quiet, directory=str(site["path"]))
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown(); srv.server_close()


def _chapter_pages():
    return {n: m.path.relative_to(ROOT / "nbs").with_suffix(".html").as_posix() for n, m in written_chapters().items()}


def test_site_builds_offline_without_warnings(site):
    info = json.loads((site["path"] / "_build_info.json").read_text())
    assert site["offline"], "the site build must run with the network cut (unshare -n); run the tests as root"
    assert info["warnings"] == [], info["warnings"]
    assert sorted(info["chapters"]) == sorted(written_chapters())
    print(f"site built offline in {site['seconds']:.1f} s")


def test_every_page_loads_from_the_site_only_with_no_console_errors(site, server, browser):
    pages = sorted(p.relative_to(site["path"]).as_posix() for p in site["path"].rglob("*.html") if "_static" not in p.parts)
    assert len(pages) >= 10
    problems = []
    for rel in pages:
        v = Visit(browser, f"{server}/{rel}")
        if v.response.status != 200: problems.append(f"{rel}: HTTP {v.response.status}")
        if v.external: problems.append(f"{rel}: {len(v.external)} requests outside 127.0.0.1, e.g. {v.external[:3]}")
        if v.console_errors: problems.append(f"{rel}: console errors {v.console_errors[:3]}")
        if v.failed: problems.append(f"{rel}: failed requests {v.failed[:3]}")
        v.close()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("n", sorted(written_chapters()))
def test_chapter_page_shows_figures_claims_stamp_and_no_errors(server, browser, site, n):
    rel = _chapter_pages()[n]
    v = Visit(browser, f"{server}/{rel}")
    page = v.page
    assert page.locator(".cell_output img").count() >= 1, "at least one figure"
    rec = json.loads(Path(site["runs"]["chapters"][n].record).read_text())
    _check_claim_cards(page, rec["claims"])
    text = page.locator("main").inner_text()
    assert page.locator(".output.error, .output.traceback").count() == 0 and "Traceback (most recent call last)" not in text
    stamp = page.locator(".dlopt-stamp").inner_text()
    assert "executed" in stamp and "mode smoke" in stamp and "torch" in stamp and "dlopt_labs" in stamp and ("CPU" in stamp or "GPU" in stamp)
    href = page.locator(".dlopt-stamp a[download]").get_attribute("href")
    nb = page.request.get(f"{server}/{Path(rel).parent.as_posix()}/{href}")
    assert nb.ok and json.loads(nb.body())["cells"], "the notebook can be downloaded"
    assert "#| export" not in text and "#| hide" not in text, "nbdev directives are not shown"
    v.close()


def test_widget_is_visible_and_its_linked_box_follows_the_control(server, browser):
    v = Visit(browser, f"{server}/{_chapter_pages()[15]}")
    page = v.page
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.scroll_into_view_if_needed()
    assert handle.is_visible()
    box = page.locator(".widget-hbox input[type=number]").first
    before = float(box.input_value())
    handle.focus()
    for _ in range(3): page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(300)
    after = float(box.input_value())
    assert after < before, (before, after)
    v.close()


@pytest.mark.parametrize("query,chapter", [("pruning", 15), ("剪枝", 15), ("calibration", 29), ("批处理", 1), ("校准", None), ("throughput", 1)])
def test_search_finds_the_chapter_in_english_and_chinese(server, browser, query, chapter):
    v = Visit(browser, f"{server}/search.html?q={query}")
    if chapter is None:                                      # a word the course does not contain: an empty result, not an error
        v.page.wait_for_function("() => /did not match|Search finished/i.test(document.querySelector('#search-results')?.innerText || '')", timeout=20000)
        assert v.page.locator("#search-results li a").count() == 0 and not v.console_errors
        return v.close()
    v.page.wait_for_selector("#search-results li a", timeout=20000)
    links = v.page.locator("#search-results li a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
    if chapter is not None:
        assert any(l.split("#")[0] == _chapter_pages()[chapter] for l in links), (query, links[:8])
    v.close()


def _check_claim_cards(page, claims):
    """Each claim is a card: its verdict a coloured badge, its claim, source, rule and evidence in full, nothing cut or
    running past the card's edge."""
    for c in claims:
        card = page.locator(f".dl-claim[data-key='{c['key']}']").first
        card.scroll_into_view_if_needed()
        assert card.is_visible(), c["key"]
        badge = card.locator(".dl-verdict")
        assert badge.inner_text().strip() == c["verdict"], (c["key"], badge.inner_text())
        colour = badge.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour not in ("rgba(0, 0, 0, 0)", "transparent"), f"{c['key']}: the verdict is a coloured badge"
        text = card.inner_text()
        for part in (c["claim"], c["source"], c["holds"], c["fails"], *c["evidence"]):
            assert part in text, (c["key"], part)
        assert "..." not in text and "…" not in text.replace(c["source"], ""), f"{c['key']}: nothing is truncated"
        overflow = card.evaluate("e => [...e.querySelectorAll('*')].filter(x => x.scrollWidth > x.clientWidth + 1 "
                                 "&& getComputedStyle(x).overflowX !== 'visible').length")
        width = card.evaluate("e => e.scrollWidth - e.clientWidth")
        assert overflow == 0 and width <= 1, f"{c['key']}: the card's content runs past its edge"


def test_claims_page_collects_every_claim_with_a_link(server, browser, site):
    v = Visit(browser, f"{server}/claims.html")
    for n, r in site["runs"]["chapters"].items():
        rec = json.loads(Path(r.record).read_text())
        _check_claim_cards(v.page, rec["claims"])
        assert v.page.locator(f"a[href^='{_chapter_pages()[n]}']").count() >= 1
    v.close()


def test_api_reference_and_hidden_cells(server, browser):
    v = Visit(browser, f"{server}/api.html")
    text = v.page.locator("main").inner_text()
    assert "dlopt_labs.training.fit" in text and "Train `model`" not in text and "Train model" in text
    v.close()
    v = Visit(browser, f"{server}/foundations/00_core.html")
    text = v.page.locator("main").inner_text()
    assert "seed_everything" in text and "from nbdev.showdoc import" not in text, "a #| hide cell is hidden"
    v.close()


def test_screenshots_of_home_and_a_chapter(server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for rel, name in (("index.html", "site-home.png"), (_chapter_pages()[15], "site-chapter15.png")):
        v = Visit(browser, f"{server}/{rel}")
        v.page.wait_for_timeout(500)
        v.page.screenshot(path=str(ARTIFACTS / name), full_page=False, timeout=30000)
        v.close()
        assert (ARTIFACTS / name).stat().st_size > 10_000
    print(f"screenshots: {ARTIFACTS / 'site-home.png'}, {ARTIFACTS / 'site-chapter15.png'}")
