"""Issue 7 in a real browser: user text is never rendered as HTML, on any page.

Every page is opened in Debian's Chromium with hostile values in each of its URL parameters (the names are
discovered from the core modules that support shareable links), then the same payloads are typed into every text
input and text area on the page and given as uploaded file names. After each round the DOM is searched for what an
injection would leave behind (an ``onerror``/``onload`` attribute, a ``javascript:`` URL, an image or link made
from a payload: pointing at ``x`` or 127.0.0.1:9, or with the payloads' alt text "t" or link text "click",
``<b>bold</b>`` drawn as bold), ``window.__xss`` must be unset, no request may have left for 127.0.0.1:9 (or any
host but the app), and no exception box may show; finally the hostile values are taken back and the page's figure
must be drawn again. tests/test_text_injection.py is the fast tier under this one (every parameter, every payload).

The running server's cross-site protections (XSRF on uploads, CORS, cross-origin WebSockets) are checked at the end.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest

from tests.browser_support import (  # noqa: F401
    app_url,
    expect,
    launch,
    new_page,
    playwright_api,
    poll,
    rerun,
    stable,
    wait_idle,
)
from tests.test_text_injection import COMBINED, PAYLOADS, url_fields

pytestmark = pytest.mark.browser

# A file name cannot hold "/", so its image points into the app; the checks know it by its alt text "t".
FILE_NAME = '<img src=x onerror="window.__xss=1"> <b>bold</b> [click](javascript:window.__xss=1) ![t](track.png)'

# URL prefix -> the page's path (app.py's url_path). Every prefix a core module declares must have a page here.
PAGES = {
    "pg_": "/",
    "ml_": "/mask_lab",
    "rm_": "/real_model",
    "ls_": "/long_sequences",
    "wt_": "/walkthrough",
    "pj_": "/projections",
    "gen_": "/generation",
}
# Valid values kept in the hostile links where the defaults are slow to compute: the Long sequences default
# (t = s = 4096, 16 heads) streams 268 M probabilities, 20-70 s here; ls_t is hostile in the unit tests instead.
KEEP_VALID = {"ls_t": "256"}
# Pages with a file uploader; each gets files with hostile names (the main test fails if an uploader appears
# elsewhere, so a new one is not missed).
UPLOAD_PAGES = ("/", "/mask_lab")


def hostile_params(prefix: str, fields: list[str]) -> dict[str, str]:
    """Every field gets a payload (taking turns, the combined one included), so each payload reaches many fields."""
    values = (*PAYLOADS, COMBINED)
    params = {prefix + name: values[i % len(values)] for i, name in enumerate(fields)}
    return {**params, **{key: value for key, value in KEEP_VALID.items() if key in params}}


def test_every_url_prefix_has_a_page():
    fields = url_fields()
    assert {"pg_", "wt_", "pj_"} <= set(fields), fields  # the pages with links today
    assert set(fields) <= set(PAGES), f"add the page of {set(fields) - set(PAGES)} to PAGES"
    assert all(len(names) >= 3 for names in fields.values()), fields


# What an injection would leave in the page; an empty list is a clean page.
FINDINGS = """() => {
  const bad = [];
  if (window.__xss !== undefined) bad.push('window.__xss was set to ' + window.__xss);
  for (const el of document.querySelectorAll('*')) {
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase(), value = attr.value.trim().toLowerCase();
      if (name.startsWith('on')) bad.push(`<${el.tagName}> carries ${attr.name}="${attr.value}"`);
      if (value.startsWith('javascript:')) bad.push(`<${el.tagName}> ${attr.name}="${attr.value}"`);
    }
    if (['IMG', 'image', 'A'].includes(el.tagName)) {
      const src = el.getAttribute('src') || el.getAttribute('href') || '';
      let url = null;
      try { url = new URL(src, location.href); } catch (e) { bad.push(`<${el.tagName}> with address ${src}`); }
      // The payloads' addresses: x, and 127.0.0.1 on any port but the app's (a bare URL in text, linked by GFM).
      if ((src === 'x' && el.tagName !== 'A') || (url && url.hostname === '127.0.0.1' && url.port !== location.port))
        bad.push(`<${el.tagName}> pointing at ${src}`);
    }
    if (el.tagName === 'IMG' && el.getAttribute('alt') === 't') bad.push(`an image made from ![t](...): ${el.src}`);
    if (el.tagName === 'A' && el.textContent === 'click') bad.push(`a link made from [click](...): ${el.href}`);
    if (el.tagName === 'SCRIPT' && el.textContent.includes('__xss')) bad.push('an inline <script> from a payload');
    if (el.childElementCount === 0 && el.textContent === 'bold') bad.push(`<b>bold</b> drawn as markup: ${el.tagName}`);
  }
  return bad;
}"""

MAIN_FIGURE = """() => {
  const plot = document.querySelector("[data-testid='stMain'] .js-plotly-plot");
  return !!(plot && plot._fullData && plot._fullData.length);
}"""

OPEN_EXPANDERS = """() => {
  const closed = Array.from(document.querySelectorAll("[data-testid='stExpander'] details:not([open]) > summary"));
  closed.forEach(s => s.click());
  return closed.length;
}"""

TEXT_BOXES = "input[type='text']:not([role='combobox']), textarea"


@pytest.fixture(scope="module")
def browser(app_url):  # noqa: F811
    with playwright_api.sync_playwright() as p:
        chromium = launch(p)
        # A fresh server may run a first deep link without app.py's navigation; open the root page first.
        warm = new_page(chromium)
        warm.goto(app_url)
        wait_idle(warm)
        warm.context.close()
        yield chromium
        chromium.close()


CLOSED_EXPANDERS = "() => document.querySelectorAll(\"[data-testid='stExpander'] details:not([open])\").length"


class Visit:
    """One page object for one app page: every request it makes is recorded, and ``check`` asserts a clean page."""

    def __init__(self, browser, app_url: str, path: str):  # noqa: F811
        self.origin = urlsplit(app_url)
        self.page = new_page(browser, 1500, 1200)  # a fresh context: a new visitor
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.app_url = app_url
        self.path = path

    def open(self, params: dict[str, str]) -> None:
        query = "?" + urlencode(params) if params else ""
        self.page.goto(self.app_url + self.path + query)
        expect(self.page.locator("[data-testid='stMain'] h1")).to_be_visible()  # the page's script has run
        wait_idle(self.page)

    def close(self) -> None:
        self.page.context.close()

    def check(self, when: str) -> None:
        """Call once the page shows the result of the last action (``rerun`` waited for its script run)."""
        findings = self.page.evaluate(FINDINGS)
        outside = [url for url in self.requests if not self._own(url)]
        exceptions = self.page.locator("[data-testid='stException']").all_inner_texts()
        assert not findings, f"{when}: {findings}"
        assert not outside, f"{when}: requests left the app: {outside}"
        assert not exceptions, f"{when}: exception box: {exceptions}"

    def _own(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme in ("data", "blob") or (parts.hostname, parts.port) == (
            self.origin.hostname,
            self.origin.port,
        )

    def open_expanders(self) -> None:
        """Open every expander (the browser's own toggle: no script run) and wait until all are open."""
        self.page.evaluate(OPEN_EXPANDERS)
        assert poll(self.page, CLOSED_EXPANDERS, lambda closed: closed == 0) == 0, "an expander did not open"

    def text_boxes(self) -> list:
        self.open_expanders()
        boxes = self.page.locator(TEXT_BOXES)

        def usable() -> list[int]:
            return [i for i in range(boxes.count()) if boxes.nth(i).is_visible() and boxes.nth(i).is_editable()]

        # The same boxes in two reads apart: every opened expander has shown its content.
        return [boxes.nth(i) for i in stable(self.page, usable, lambda _: True)]

    def type_into_all(self, value: str) -> list[str]:
        """Type ``value`` into every visible text box (committing each); return what the boxes held before."""
        before = []
        for box in self.text_boxes():
            before.append(box.input_value())
            self._commit(box, value)
        return before

    def restore(self, values: list[str]) -> None:
        for box, value in zip(self.text_boxes(), values, strict=False):
            if box.input_value() != value:
                self._commit(box, value)

    def _commit(self, box, value: str) -> None:
        """Fill and commit ``box``; return once the script run that the new value starts has been drawn."""
        with rerun(self.page):
            box.fill(value)
            # Streamlit commits a text input on Enter, a text area on Ctrl+Enter; both on blur.
            box.press("Control+Enter" if box.evaluate("e => e.tagName") == "TEXTAREA" else "Enter")

    def uploaders(self):
        self.open_expanders()
        return self.page.locator("[data-testid='stFileUploader'] input[type='file']")

    def figure_drawn(self, timeout_ms: int = 120_000) -> None:
        self.page.wait_for_function(MAIN_FIGURE, timeout=timeout_ms)

    def shows(self, text: str) -> int:
        """How many elements show ``text`` (waiting for at least one; 0 only after the timeout)."""
        found = self.page.get_by_text(text, exact=False)
        return poll(self.page, found.count, lambda n: n >= 1)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


# 0/1 integers, 4 x 4: a (positions, features) input for the Playground and a (t, s) mask for the Mask Lab.
GOOD_NPY = _npy(np.tril(np.ones((4, 4), dtype=np.int64)))


def _draws_by_default(path: str) -> bool:
    """Whether the page draws a figure with no choice made: the Generation page needs a causal LM, which it has
    by default only where attnviz ships its packaged decoder."""
    if path != "/generation":
        return True
    from attnviz import models

    try:
        models.packaged_decoder_path()
    except (AttributeError, ValueError):
        return False
    return True


def _page_cases():
    return [pytest.param(prefix, path, id=path.strip("/") or "playground") for prefix, path in PAGES.items()]


@pytest.mark.parametrize(("prefix", "path"), _page_cases())
def test_no_user_text_is_rendered_as_html(browser, app_url, prefix, path):  # noqa: F811
    visit = Visit(browser, app_url, path)
    try:
        params = hostile_params(prefix, url_fields().get(prefix, []))
        visit.open(params)
        if params:  # the notice comes with the page's first full run (after a model load, a long computation)
            expect(visit.page.get_by_text("were not valid and were replaced by defaults").first).to_be_visible()
            # The payloads are shown as the text they are.
            assert visit.shows("onerror=") >= 1
        if _draws_by_default(path):
            visit.figure_drawn()
        else:  # nothing to draw until a model is chosen: the page says so
            assert visit.shows("packaged decoder is not installed") >= 1
        visit.check(f"{path} opened with hostile URL values {sorted(params)}")

        # All payloads at once in every box (each payload alone, and at the start of a line, is the unit tests').
        originals = visit.type_into_all(COMBINED)
        visit.check(f"{path} with every payload typed into each of its {len(originals)} text boxes")
        visit.restore(originals)

        if path == "/real_model":  # the model directory box shows only for a local model
            with rerun(visit.page):
                visit.page.get_by_text("Local model directory", exact=True).click()
            expect(visit.page.get_by_label("Model directory", exact=True)).to_be_visible()
            originals = visit.type_into_all(COMBINED)
            visit.check("/real_model with every payload as the model directory")
            visit.restore(originals)
            with rerun(visit.page):
                visit.page.get_by_text("Packaged MiniLM", exact=False).first.click()

        assert visit.uploaders().count() == 0 or path in UPLOAD_PAGES, f"add {path} to UPLOAD_PAGES"
        if _draws_by_default(path):
            visit.figure_drawn()
        visit.check(f"{path} at the end")
    finally:
        visit.close()


@pytest.mark.parametrize("path", UPLOAD_PAGES, ids=[p.strip("/") or "playground" for p in UPLOAD_PAGES])
def test_uploaded_file_names_are_text(browser, app_url, path):  # noqa: F811
    """A file accepted and a file refused, both named with the payloads: the name is shown, never rendered."""
    visit = Visit(browser, app_url, path)
    try:
        visit.open({})
        visit.figure_drawn()
        uploader = visit.uploaders()
        assert uploader.count() >= 1, f"no file uploader on {path}"
        for name, data in ((FILE_NAME + ".npy", GOOD_NPY), (FILE_NAME + " (refused).npy", b"not a .npy file")):
            with rerun(visit.page):
                uploader.first.set_input_files({"name": name, "mimeType": "application/octet-stream", "buffer": data})
            visit.check(f"{path} after uploading a file named {name!r}")
        assert visit.shows("onerror=") >= 1, "the file name is not shown"
        visit.figure_drawn()
    finally:
        visit.close()


# ---------------------------------------------------------------------------------------------------------------
# The running server's cross-site protections (.streamlit/config.toml as the server applies it)
# ---------------------------------------------------------------------------------------------------------------


def _xsrf_cookie(app_url: str) -> tuple[str, str]:  # noqa: F811
    with urllib.request.urlopen(app_url + "/_stcore/health", timeout=10) as response:
        cookie = response.headers["set-cookie"].split(";")[0]
    return cookie, cookie.split("=", 1)[1]


def _put(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"\x93NUMPY", method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_an_upload_without_the_xsrf_token_is_refused(app_url):  # noqa: F811
    url = app_url + "/_stcore/upload_file/some-session/some-file"
    status, body = _put(url, {})
    assert status == 403 and "XSRF" in body, (status, body)
    cookie, token = _xsrf_cookie(app_url)
    status, body = _put(url, {"Cookie": cookie, "X-Xsrftoken": "2|00000000|" + "0" * 32 + "|0"})
    assert status == 403 and "XSRF" in body, (status, body)  # a forged token
    # With the real token the XSRF check passes and the request fails later, on the unknown session.
    status, body = _put(url, {"Cookie": cookie, "X-Xsrftoken": token})
    assert status == 400 and "session" in body, (status, body)


def test_other_sites_can_neither_read_responses_nor_open_a_session(app_url):  # noqa: F811
    websockets = pytest.importorskip("websockets")
    request = urllib.request.Request(app_url + "/_stcore/health", headers={"Origin": "http://evil.example"})
    with urllib.request.urlopen(request, timeout=10) as response:
        allowed = response.headers.get("access-control-allow-origin")
    stream = app_url.replace("http://", "ws://") + "/_stcore/stream"

    from websockets.sync.client import connect as ws_connect  # sync: Playwright's loop may be running here

    def connect(origin: str) -> bool:
        try:
            with ws_connect(stream, origin=origin, subprotocols=["streamlit"], open_timeout=10):
                return True
        except websockets.exceptions.InvalidStatus:
            return False

    assert connect(app_url), "the app's own origin must be able to connect"
    assert allowed in (None, app_url), f"a foreign origin may read responses: Access-Control-Allow-Origin {allowed}"
    assert not connect("http://evil.example"), "a page on another site opened a session"
