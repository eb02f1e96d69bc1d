"""The built-in web page (lmserve/web) in a real browser: Debian's chromium (`apt-get install chromium`) driven by
Playwright's Python package (no browser download), against real api_servers and a real proxy on 127.0.0.1.

Screenshots go to $LMSERVE_TEST_ARTIFACTS (else a pytest temp dir); with LMSERVE_UPDATE_DOC_IMAGES=1 they also
replace docs/images/*.png.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import API_SERVER_ARGS, start_api_server

import lmserve.web

CHROMIUM = os.environ.get("LMSERVE_CHROMIUM", "/usr/bin/chromium")
API_KEY = "web-test-key"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(600)
browser_test = pytest.mark.slow


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, smollm2_path):
    """An api_server of its own, with an API key; test_wrong_key_then_server_stopped_mid_reply kills it."""
    server = start_api_server(tmp_path_factory.mktemp("web_keyed"), *API_SERVER_ARGS, "--api-keys", API_KEY,
                              health_headers={"Authorization": f"Bearer {API_KEY}"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    path = os.environ.get("LMSERVE_TEST_ARTIFACTS")
    out = Path(path) if path else tmp_path_factory.mktemp("web_artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def screenshot(page, artifacts: Path, name: str) -> None:
    page.wait_for_timeout(300)   # let a chart redraw after a resize
    page.screenshot(path=str(artifacts / name))
    if os.environ.get("LMSERVE_UPDATE_DOC_IMAGES") == "1":
        (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(artifacts / name, REPO / "docs" / "images" / name)


def open_page(browser, url: str, hash_: str = ""):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(f"{url}/{hash_}")
    return page


def last_reply(page):
    return page.locator(".msg.assistant").last


def reply_text(page) -> str:
    return last_reply(page).locator(".content").inner_text()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def running_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^lmserve:num_requests_running (\S+)$", text, re.M).group(1))


def set_settings(page, **settings) -> None:
    for name, value in settings.items():
        page.fill(f"[data-setting={name}]", str(value))


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_reply_done(page, timeout: float = 180) -> None:
    page.wait_for_selector("#messages[aria-busy=false] .msg.assistant", timeout=timeout * 1000)


def chat_bodies(page) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    return bodies


# ---- no browser needed ----------------------------------------------------------------------------------------
def test_page_is_served_offline_small_and_open_without_a_key(keyed_server):
    files = [p for p in Path(lmserve.web.WEB_DIR).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 2 * 1024 * 1024
    for p in files:   # nothing is fetched from the internet: no absolute URLs in what the browser loads
        if p.suffix in (".html", ".css") or p.name in ("main.js", "chat.js", "api.js", "dashboard.js", "render.js"):
            assert not re.search(r"""(src|href|import|from|url\()\s*=?\s*["'(]\s*(https?:)?//""", p.read_text()), p
    index = httpx.get(f"{keyed_server.url}/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert 'src="web/main.js"' in index.text
    for path in ("web/main.js", "web/vendor/marked.esm.js", "web/vendor/purify.es.mjs", "web/style.css"):
        assert httpx.get(f"{keyed_server.url}/{path}").status_code == 200, path
    assert httpx.get(f"{keyed_server.url}/web/nope.js").status_code == 404
    r = httpx.get(f"{keyed_server.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed_server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).is_success


# ---- in the browser -------------------------------------------------------------------------------------------
@browser_test
def test_chat_streams_settings_stop_regenerate_reload(browser, api_server_url, artifacts):
    page = open_page(browser, api_server_url)
    bodies = chat_bodies(page)
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    set_settings(page, temperature=0.9, max_tokens=12, seed=7)

    # Enter sends; the answer streams in (text grows over several frames); token count and tok/s appear
    send(page, "Name three colors.")
    lengths = []
    while page.locator("#stop").is_visible() or not lengths:
        if page.locator(".msg.assistant").count():
            lengths.append(len(reply_text(page)))
        page.wait_for_timeout(30)
    wait_reply_done(page)
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) >= 3, f"the reply did not grow over several frames: {lengths}"
    stats = last_reply(page).locator(".stats").inner_text()
    assert re.search(r"\b(\d+) tokens", stats) and int(re.search(r"\b(\d+) tokens", stats).group(1)) <= 12, stats
    assert "tok/s" in stats, stats
    # the settings reached the request
    assert bodies[0]["temperature"] == 0.9 and bodies[0]["max_tokens"] == 12 and bodies[0]["seed"] == 7
    assert bodies[0]["stream"] is True and bodies[0]["messages"][-1] == {"role": "user", "content": "Name three colors."}

    # Stop mid-stream (Esc) aborts the request on the server
    set_settings(page, max_tokens=400, seed="")
    send(page, "Tell me a long story about a dragon.")
    wait_until(lambda: len(reply_text(page)) > 0, 120, "the second reply to start")
    assert running_requests(api_server_url) >= 1
    page.keyboard.press("Escape")
    wait_until(lambda: running_requests(api_server_url) == 0, 15, "the server's running requests to drop to 0")
    assert "stopped" in last_reply(page).locator(".stats").inner_text()
    assert page.locator("#send").is_visible()

    # regenerate: the same history is sent again (without the old reply), and a different answer comes back
    set_settings(page, max_tokens=8, temperature=1.0)
    answers = []
    for _ in range(4):
        n = len(bodies)
        last_reply(page).locator("button.regenerate").click()
        wait_until(lambda: len(bodies) > n, 10, "the regenerate request")
        wait_reply_done(page)
        assert bodies[-1]["messages"] == bodies[1]["messages"]
        answers.append(reply_text(page))
        if len(answers) >= 2 and answers[-1] != answers[-2]:
            break
    assert len(set(answers)) >= 2, f"regenerate gave the same answer every time: {answers}"
    assert page.locator(".msg.assistant").count() == 2

    # reload: the conversation is still there
    before = page.locator("#messages").inner_text()
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator("#messages").inner_text() == before
    assert page.locator("#conversations li").count() == 1
    screenshot(page, artifacts, "web_chat_desktop.png")
    page.set_viewport_size(PHONE)
    page.reload()     # at phone width the settings start folded
    page.wait_for_selector(".msg.assistant")
    screenshot(page, artifacts, "web_chat_phone.png")
    assert not page.errors, page.errors


@browser_test
def test_model_output_is_shown_as_text_never_run(browser, api_server_url):
    """The real server's stream, with the first content delta replaced by hostile HTML on its way to the page."""
    payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> **bold** [a](javascript:alert(1))'

    def inject(route):
        response = route.fetch()
        events = response.text().split("\n\n")
        for i, event in enumerate(events):
            if event.startswith("data: {"):
                chunk = json.loads(event[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    chunk["choices"][0]["delta"]["content"] = payload
                    events[i] = "data: " + json.dumps(chunk)
                    break
        else:
            raise AssertionError("no content delta in the server's stream")
        route.fulfill(response=response, body="\n\n".join(events))

    page = open_page(browser, api_server_url)
    page.route("**/v1/chat/completions", inject)
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    set_settings(page, max_tokens=3)
    send(page, "Say hi.")
    wait_reply_done(page)
    content = last_reply(page).locator(".content")
    text = content.inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text and "<script>window.__pwned=2</script>" in text
    assert content.locator("strong").inner_text() == "bold"            # Markdown still renders
    assert page.locator("#messages img, #messages script").count() == 0
    assert content.locator("a").get_attribute("href") in (None, "")     # javascript: URLs are dropped
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None


@browser_test
def test_dashboard_charts_move_under_load(browser, api_server_url, artifacts):
    import openai
    page = open_page(browser, api_server_url, "#dashboard")
    tile = page.locator("[data-metric=throughput]")
    page.wait_for_function("""() => {
        const c = document.querySelector('[data-metric=requests] canvas');
        if (!c) return false;     // the dashboard builds its tiles after the first /metrics poll
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
        return false; }""", timeout=30_000)
    total = lambda: int(re.search(r"(\d+) total", tile.locator(".value").inner_text()).group(1))  # noqa: E731
    before = total()

    client = openai.OpenAI(base_url=f"{api_server_url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id

    def one(i):
        # long enough (ignore_eos) that the 1 s dashboard poll sees them running even on a fast idle machine
        client.chat.completions.create(model=model, max_tokens=256, temperature=0, extra_body={"ignore_eos": True},
                                       messages=[{"role": "user", "content": f"Count to {i + 5}."}])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    saw_running = wait_until(
        lambda: re.match(r"[1-9]\d* running", page.locator("[data-metric=requests] .value").inner_text()), 120,
        "the dashboard to show running requests")
    assert saw_running
    for t in threads:
        t.join(300)
    wait_until(lambda: total() >= before + 30, 30, "the generated-token total to grow")
    page.wait_for_function("() => !document.querySelector('[data-metric=ttft] .value').textContent.includes('–')")
    screenshot(page, artifacts, "web_dashboard_desktop.png")
    page.set_viewport_size(PHONE)
    screenshot(page, artifacts, "web_dashboard_phone.png")
    assert not page.errors, page.errors


@browser_test
def test_proxy_page_lists_nodes_and_chats_through_them(browser, api_server_url):
    from test_proxy_fakes import ServerThread

    from lmserve.proxy.app import build_app
    from lmserve.proxy.config import ProxyConfig
    proxy = ServerThread(build_app(ProxyConfig(server_name="127.0.0.1", health_check_interval=60.0))).start()
    try:
        assert httpx.post(f"{proxy.url}/nodes/add", json={"url": api_server_url}).status_code == 200
        page = open_page(browser, proxy.url, "#dashboard")
        row = page.locator(f"tr[data-node='{api_server_url}']")
        row.wait_for(timeout=15_000)
        assert "healthy" in row.inner_text()
        assert page.locator("[data-metric=in_flight]").count() == 1
        page.click("#tab-chat")
        page.wait_for_function("() => document.getElementById('model').options.length > 0")
        set_settings(page, max_tokens=3)
        send(page, "Hi")
        wait_reply_done(page)
        assert len(reply_text(page)) > 0 and re.search(r"\b[1-3] tokens", last_reply(page).locator(".stats").inner_text())
        assert not page.errors, page.errors
    finally:
        proxy.stop(force=True)


@browser_test
def test_wrong_key_then_server_stopped_mid_reply(browser, keyed_server):
    page = open_page(browser, keyed_server.url)
    # no key: the page is there and says why the API refuses
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.inner_text("#error") and "API key" in page.inner_text("#error")
    assert page.locator("#prompt").is_visible()
    page.fill("#api-key", "wrong-key")
    page.press("#api-key", "Tab")
    send(page, "Hello?")
    wait_reply_done(page)
    error = last_reply(page).locator(".msg-error")
    assert error.is_visible() and "401" in error.inner_text() and "API key" in error.inner_text()

    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    set_settings(page, max_tokens=400)
    send(page, "Write a long poem about the sea.")
    wait_until(lambda: len(reply_text(page)) > 0, 120, "the reply to start")
    keyed_server.proc.kill()
    page.wait_for_selector(".msg.assistant >> nth=-1 >> .msg-error:not([hidden])", timeout=30_000)
    partial = reply_text(page)
    assert partial, "the partial reply was lost"
    assert page.locator("#error").is_visible() and page.inner_text("#error")
    assert not page.errors, page.errors
