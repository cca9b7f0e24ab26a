"""The web UI (SPEC section 12): served without a key, under the CSP, from same-origin static files only."""
from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from support import ROOT

STATIC = ROOT / "static"
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
                 ".svg": ("image/svg+xml",)}


class PageScan(HTMLParser):
    """What the CSP cares about in a page: external references, inline scripts, inline styles, ids."""

    def __init__(self):
        super().__init__()
        self.refs, self.inline_scripts, self.style_attrs, self.style_tags, self.handlers = [], [], [], 0, []
        self.ids = set()
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        if "style" in attrs:
            self.style_attrs.append(tag)
        self.handlers += [name for name in attrs if name.startswith("on")]
        if tag == "script":
            self._in_script = True
            if attrs.get("src"):
                self.refs.append(attrs["src"])
        elif tag == "link" and attrs.get("href"):
            self.refs.append(attrs["href"])
        elif tag == "style":
            self.style_tags += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def scan(html: str) -> PageScan:
    page = PageScan()
    page.feed(html)
    return page


def test_index_is_served_without_a_key_under_the_csp(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.mimetype == "text/html"
    assert "<title>llm-proxy</title>" in r.get_data(as_text=True)
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_every_script_and_stylesheet_is_served_with_its_content_type(client):
    refs = scan(client.get("/").get_data(as_text=True)).refs
    assert {"/static/app.js", "/static/style.css"} <= set(refs)
    for ref in refs:
        assert ref.startswith("/static/"), f"{ref} is not a same-origin static file"
        r = client.get(ref)
        assert r.status_code == 200, ref
        assert r.mimetype in CONTENT_TYPES[ref[ref.rindex("."):]], (ref, r.mimetype)
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_page_has_no_inline_script_or_style_the_csp_would_block():
    page = scan((STATIC / "index.html").read_text())
    assert page.inline_scripts == []
    assert page.style_attrs == [] and page.style_tags == 0
    assert page.handlers == []  # onclick= and friends are inline scripts too


def test_script_builds_the_page_with_dom_calls_only():
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, f"app.js uses {sink}: API data must go through textContent"
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", js), "app.js must only call its own origin"


def test_every_element_the_script_looks_up_exists():
    ids = scan((STATIC / "index.html").read_text()).ids
    wanted = set(re.findall(r"\$\('([\w-]+)'\)", (STATIC / "app.js").read_text()))
    assert wanted and wanted <= ids, sorted(wanted - ids)


def test_the_ui_calls_the_spec_endpoints():
    js = (STATIC / "app.js").read_text()
    for path in ("/v1/models", "/v1/chat/completions", "/api/keys", "/api/usage?group_by=", "/api/status"):
        assert path in js
    assert "sessionStorage" in js and "'Bearer '" in js and "x-llm-num-calls" in js


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_script_parses():
    result = subprocess.run(["node", "--check", str(STATIC / "app.js")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
