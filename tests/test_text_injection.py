"""User text is never rendered: ``attnviz.app.ui.widgets.literal`` for Streamlit markdown, ``figures.plotly_text``
for Plotly, and the places that use them (link notices, configuration errors, upload names, figure labels).

Markdown is checked with markdown-it-py (CommonMark, the parser family Streamlit's front end follows) and the
rendered HTML must hold the user's characters as text and no element made from them. The real front end is
driven in tests/test_browser_injection.py; this file is the fast, exhaustive tier (every URL parameter of every
page, every payload, random text).
"""

from __future__ import annotations

import functools
import html
import importlib
import pkgutil
import re
import string
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnviz import figures, pagemodels
from attnviz.app.ui.widgets import WORD_JOINER, literal
from attnviz.formats import urlstate

markdown_it = pytest.importorskip("markdown_it")

# Each one would run code, fetch an outside URL, make a link or change the text's look if it were rendered.
PAYLOADS = (
    '<img src=x onerror="window.__xss=1">',
    "<script>window.__xss=1</script>",
    '"><svg onload="window.__xss=1">',
    "[click](javascript:window.__xss=1)",
    "![t](http://127.0.0.1:9/track.png)",
    "<b>bold</b>",
)
COMBINED = " ".join(PAYLOADS)  # 182 characters: fits a URL value (200) and the Mask Lab formula (200)
# What else Streamlit's markdown would draw: emphasis, code, math, directives, shortcodes, bare URLs, entities,
# block starts.
MORE = (
    "**bold** _it_ `code` ~~gone~~ $x^2$",
    ":red[red] :material/home: :smile:",
    "see http://evil.example/x and www.evil.example or me@evil.example",
    "&lt;b&gt; &amp; &#60;",
    "# heading",
    "1. item",
    "- item",
    "> quote",
    "[ref]: http://evil.example",
    "a\n\n# two lines\n- and a list",
    "\\[escaped\\](x) \\\\",
)
MD = markdown_it.MarkdownIt("commonmark").enable(["strikethrough", "table"])
PAGEMODELS = Path(pagemodels.__file__).parent


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


def elements(rendered: str) -> tuple[list[str], list]:
    parser = _Elements()
    parser.feed(rendered)
    return parser.tags, parser.attrs


def text_of(rendered: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", rendered)).replace(WORD_JOINER, "").strip()


def assert_literal_markdown(source: str, shown: str, allowed=("p",)) -> None:
    """``source`` renders to ``shown`` as plain text inside the ``allowed`` elements, with no attributes."""
    rendered = MD.render(source)
    tags, attrs = elements(rendered)
    assert set(tags) <= set(allowed) and not attrs, (source, rendered)
    assert " ".join(shown.split()) in " ".join(text_of(rendered).split()), (shown, rendered)


# ---------------------------------------------------------------------------------------------------------------
# literal: markdown
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*PAYLOADS, COMBINED, *MORE])
def test_literal_text_renders_as_itself(text):
    assert_literal_markdown("got " + literal(text), "got " + text)
    assert_literal_markdown(literal(text), text)  # also where it starts the line


@pytest.mark.parametrize(
    "message",
    [
        "num_heads (6) must be divisible by num_kv_heads (4)",
        "key lengths [8, 9] exceed s=8",
        "valid_lens: expected whole numbers separated by commas (e.g. '3, 2'), got '3, x'",
        "x.npy",
        "documents must sum to t=8, they sum to 6",
    ],
)
def test_ordinary_messages_keep_their_source(message):
    """Only what would render is escaped: messages (and the tests that quote them) read as before."""
    assert literal(message) == message


def test_bare_urls_and_addresses_are_not_linked():
    out = literal("http://evil.example www.evil.example me@evil.example")
    assert "http:/" + WORD_JOINER + "/evil" in out and "www" + WORD_JOINER in out and "@" + WORD_JOINER in out


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=string.ascii_letters[:5] + "019" + string.punctuation + " \n", max_size=40))
def test_any_text_renders_as_itself(text):
    """Random text made mostly of markdown's metacharacters comes out character for character."""
    shown = re.sub(r"[\r\n]+", " ", text)
    for prefix in ("got ", ""):
        expected = (prefix + shown).strip(" ")
        rendered = MD.render(prefix + literal(text)).replace(WORD_JOINER, "")
        assert rendered == (f"<p>{html.escape(expected).replace('&#x27;', chr(39))}</p>\n" if expected else "")


# ---------------------------------------------------------------------------------------------------------------
# Every URL parameter of every page: the notices it produces are shown as text
# ---------------------------------------------------------------------------------------------------------------


def _link_modules():
    """(module, source text) of every page model that can declare links: a module, or a package's files together.

    Only what mentions URL_PREFIX is imported (the model code pulls in transformers otherwise)."""
    for info in pkgutil.iter_modules(pagemodels.__path__):
        path = PAGEMODELS / (info.name if info.ispkg else f"{info.name}.py")
        files = sorted(path.glob("*.py")) if info.ispkg else [path]
        source = "\n".join(f.read_text() for f in files)
        if "URL_PREFIX" in source:
            yield importlib.import_module(f"attnviz.pagemodels.{info.name}"), source


@functools.cache
def url_fields() -> dict[str, list[str]]:
    """{prefix: parameter names} of every core module with shareable links (``URL_PREFIX`` and ``from_url``).

    Names come from the decoded default config(s), flattened as ``attnviz.urlstate`` writes a link, and from a
    probe: every identifier in the module's source is offered as a parameter holding garbage, and the names that
    the module's ``*from_url`` functions report on are parameters too (settings a module encodes by hand, and
    view parameters read by a second function). A module that gains links, or a config that gains a field, is
    covered without editing the tests.
    """
    found: dict[str, list[str]] = {}
    for module, source in _link_modules():
        prefix, from_url = getattr(module, "URL_PREFIX", None), getattr(module, "from_url", None)
        if not isinstance(prefix, str) or not callable(from_url):
            continue
        names = found.setdefault(prefix, [])
        for name in _flat_names(from_url({})) + _probed_names(module, prefix, source):
            if name not in names:
                names.append(name)
    return found


def url_readers(prefix: str) -> list:
    """The ``*from_url`` functions of the module with this prefix, each taking only the params."""
    for module, source in _link_modules():
        if f'URL_PREFIX = "{prefix}"' not in source:
            continue
        base = _parts(module.from_url({}))[0].config
        return [functools.partial(_read, getattr(module, n), base) for n in dir(module) if n.endswith("from_url")]
    raise AssertionError(f"no module declares URL_PREFIX = {prefix!r}")


def _read(reader, base, params):
    try:
        return reader(params)
    except TypeError:  # a second reader that needs the config, e.g. view_from_url(params, config)
        return reader(params, base)


def _parts(decoded) -> tuple:
    return decoded if isinstance(decoded, tuple) else (decoded,)


def _flat_names(decoded) -> list[str]:
    names = []
    for part in _parts(decoded):
        try:
            names += list(urlstate.flatten(part.config))
        except ValueError:  # leaf names repeat in nested components: the probe finds the module's own names
            pass
    return names


def _probed_names(module, prefix: str, source: str) -> list[str]:
    words = sorted(set(re.findall(r"\b[a-z][a-z0-9_]{0,39}\b", source)))
    probe = {prefix + word: "<b>bold</b>" for word in words}
    base = _parts(module.from_url({}))[0].config
    said = " ".join(
        notice
        for name in dir(module)
        if name.endswith("from_url")
        for part in _parts(_read(getattr(module, name), base, probe))
        for notice in part.notices
    )
    return [word for word in words if re.search(rf"\b{re.escape(prefix + word)}\b", said)]


def test_url_parameters_are_discovered_for_the_shareable_pages():
    fields = url_fields()
    assert {"pg_", "wt_", "pj_"} <= set(fields), fields
    assert {"t", "seed", "valid_lens", "documents"} <= set(fields["pg_"])
    assert all(len(names) >= 3 for names in fields.values()), fields


@pytest.mark.parametrize("prefix", sorted(url_fields()))
def test_every_notice_from_a_hostile_link_is_shown_as_text(prefix):
    """Each payload in each parameter on its own, then all at once: every notice, as show_notices writes it."""
    readers = url_readers(prefix)
    names = url_fields()[prefix]
    trials = [{prefix + name: payload} for name in names for payload in (*PAYLOADS, COMBINED)]
    trials.append({prefix + name: PAYLOADS[i % len(PAYLOADS)] for i, name in enumerate(names)})
    shown = 0
    for params in trials:
        for read in readers:
            for part in _parts(read(params)):
                for notice in part.notices:
                    assert_literal_markdown(f"- {literal(notice)}", notice, allowed=("ul", "li", "p"))
                    shown += 1
    assert shown >= len(names), f"{prefix}: hostile values gave only {shown} notices for {len(names)} parameters"


# ---------------------------------------------------------------------------------------------------------------
# The Streamlit side: notices, configuration errors, upload names
# ---------------------------------------------------------------------------------------------------------------


def _messages_page():
    import streamlit as st

    from attnviz.app.ui import sharing
    from attnviz.app.ui.widgets import show_config_error

    text = st.session_state["payload"]
    st.session_state["zz_url_notices"] = [f"zz_t: {text!r} is not a whole number; using the default 8"]
    sharing.show_notices("zz")
    show_config_error(ValueError(f"valid_lens: expected whole numbers, got {text!r}"))
    show_config_error(RuntimeError(text))


@pytest.mark.parametrize("payload", [COMBINED, *MORE])
def test_notices_and_errors_show_the_user_text_as_text(payload):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_messages_page)
    at.session_state["payload"] = payload
    at.run()
    assert not at.exception
    assert len(at.warning) == 1 and len(at.error) == 2
    for element in [*at.warning, *at.error]:
        assert_literal_markdown(element.value, "", allowed=("p", "strong", "ul", "li"))
    assert "were not valid" in at.warning[0].value and "cannot run" in at.error[0].value


def test_an_uploaded_file_name_is_text():
    from attnviz.app.ui.playground import Upload

    x = {"x": np.zeros((1, 2, 3), np.float32)}
    upload = Upload(name=COMBINED + ".npy", original=x, tensors=x, sizes={}, sha256="0" * 64, source_sha256="0" * 64)
    assert_literal_markdown(upload.describe(), "onerror=", allowed=("p", "strong"))


# ---------------------------------------------------------------------------------------------------------------
# Plotly
# ---------------------------------------------------------------------------------------------------------------


def test_plotly_text_escapes_markup_only():
    assert figures.plotly_text('<b>x</b> & "q"') == '&lt;b&gt;x&lt;/b&gt; &amp; "q"'


def test_figure_labels_from_the_user_are_text():
    from attnviz.pagemodels import playground as pg

    config = pg.PlaygroundConfig(t=6, s=6, batch=1, num_heads=2, num_kv_heads=0)
    record = pg.run(config)
    labels = list(PAYLOADS)
    built = [
        figures.attention_heads_figure(record, 0, query_labels=labels, key_labels=labels),
        figures.output_figure(record, 0, query_labels=labels),
        figures.head_outputs_figure(record, 0, query_labels=labels),
        figures.contribution_norms_figure(record, 0, query_labels=labels),
    ]
    for fig in built:
        axes = [getattr(trace, axis) for trace in fig.data for axis in ("x", "y")]
        tokens = [v for values in axes if values is not None for v in values if isinstance(v, str) and ":" in v]
        assert tokens and not any("<" in v or ">" in v for v in tokens), tokens
        assert any("&lt;img src=x" in v for v in tokens)
