"""Uploads through the real uploader: Playwright sets a file on st.file_uploader in Debian's Chromium."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from tests.browser_support import (  # noqa: F401
    app_url,
    assert_no_exception,
    expect,
    launch,
    new_page,
    playwright_api,
    poll,
    rerun,
    stable,
    wait_idle,
)

pytestmark = pytest.mark.browser

# Rows (queries) and columns (keys) of the first head's heatmap, as the browser holds it.
FIRST_HEAD_SHAPE = """() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data) return null;
  const tr = plot.data.find(t => t.type === 'heatmap' && !t.name.includes('masked'));
  if (!tr) return null;
  const z = tr.z;
  if (z && z.shape) return z.shape.split(',').map(Number);  // a typed-array payload {dtype, bdata, shape}
  return [z.length, z[0].length];
}"""


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_upload_updates_the_heads_and_a_hostile_file_is_refused(app_url, tmp_path):  # noqa: F811
    x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    good = tmp_path / "x5.npy"
    np.save(good, x)
    hostile = tmp_path / "evil.pt"
    hostile.write_bytes(pickle.dumps({"x": Evil()}))
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        page = new_page(browser)
        page.goto(app_url)
        wait_idle(page)
        assert poll(page, FIRST_HEAD_SHAPE, lambda s: s == [8, 8]) == [8, 8]  # the default preset: t = s = 8
        page.get_by_text("Upload inputs", exact=True).click()  # an expander: no script run
        uploader = page.locator("[data-testid='stFileUploader'] input[type='file']")
        with rerun(page):
            uploader.set_input_files(str(good))
        assert poll(page, FIRST_HEAD_SHAPE, lambda s: s == [5, 5]) == [5, 5]
        expect(page.get_by_text("Using uploaded inputs")).to_have_count(1)
        assert_no_exception(page)

        with rerun(page):
            uploader.set_input_files(str(hostile))
        error = page.get_by_test_id("stAlertContentError")
        expect(error.filter(has_text="evil.pt").first).to_be_visible()
        expect(error.filter(has_text="still showing the previous uploaded inputs")).not_to_have_count(0)
        errors = error.all_inner_texts()
        assert errors and all("evil.pt" in e and "refused" in e for e in errors), errors
        assert_no_exception(page)
        assert stable(page, FIRST_HEAD_SHAPE) == [5, 5]  # the previous figure stays...
        expect(page.get_by_text("Using uploaded inputs")).to_have_count(1)  # ...on the previous uploaded inputs
        page.screenshot(path=str(tmp_path / "uploads.png"), full_page=True)
        browser.close()


def test_hostile_bytes_are_not_a_pickle_we_could_load():
    """The fixture really is hostile: a plain pickle.loads would run its payload."""
    payload = pickle.dumps({"x": Evil()})
    with pytest.raises(ValueError, match="files are never unpickled here"):
        from attnviz.formats import uploads

        uploads.load_arrays("evil.pt", payload)
    assert b"print" in payload and io.BytesIO(payload).read(1) == b"\x80"
