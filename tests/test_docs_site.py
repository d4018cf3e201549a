"""The documentation site: formulas become MathML at build time (docs/_hooks/mathml.py), the strict build holds
no raw TeX and fetches nothing from the internet, and the metric definitions and the quickstart render in a real
headless browser: formulas laid out as math, every image decoded."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import chromium, chromium_probe
from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
MATHML = "{http://www.w3.org/1998/Math/MathML}"
PAGES = ("auditing_metrics", "quickstart")  # the metric definitions (formulas) and the quickstart (a figure)
# TeX left as text: arithmatex's delimiters, dollars, or a command such as \frac
RAW_TEX = re.compile(r"\\[()\[\]]|\$|\\[A-Za-z]+")
EXTERNAL = re.compile(r"""<(?:link|script|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_mathml_hook", ROOT / "docs" / "_hooks" / "mathml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mathml = _hook()


def _tree(markup: str) -> ET.Element:
    return ET.fromstring(markup)


def _texts(root: ET.Element, tag: str) -> list[str]:
    return [e.text or "" for e in root.iter(MATHML + tag)]


# --- the hook, on formulas whose MathML is known -------------------------------------------------------------

def test_fraction_becomes_mfrac_of_its_numerator_and_denominator() -> None:
    root = _tree(mathml.tex_to_mathml(r"\frac{a}{b}", display=False))
    assert root.tag == MATHML + "math" and root.get("display") == "inline"
    (frac,) = root.iter(MATHML + "mfrac")
    num, den = list(frac)
    assert _texts(num, "mi") == ["a"] and _texts(den, "mi") == ["b"]


def test_display_formula_is_block_math() -> None:
    root = _tree(mathml.tex_to_mathml(r"\sqrt{2}", display=True))
    assert root.get("display") == "block"
    (sqrt,) = root.iter(MATHML + "msqrt")
    assert _texts(sqrt, "mn") == ["2"]


def test_escaped_underscore_in_text_prints_without_backslash() -> None:
    # latex2mathml alone gives <mtext>within\_label\_acc</mtext>
    root = _tree(mathml.tex_to_mathml(r"\text{within\_label\_acc} = 1", display=False))
    assert _texts(root, "mtext") == ["within_label_acc"]


def test_plain_delimiters_do_not_stretch_but_left_right_do() -> None:
    root = _tree(mathml.tex_to_mathml(r"\lVert a \rVert \left( \frac{1}{2} \right)", display=True))
    mos = {(e.text, e.get("stretchy")) for e in root.iter(MATHML + "mo")}
    assert ("\u2016", "false") in mos, mos  # \lVert, \rVert: as in TeX, no growth
    assert ("(", "true") in mos and (")", "true") in mos, mos


@pytest.mark.parametrize("tex, named", [(r"\notacommand{x}", r"\notacommand"), (r"\frac{a}{", r"\frac{a}{")])
def test_unknown_or_broken_tex_stops_the_build_naming_page_and_formula(tex: str, named: str) -> None:
    with pytest.raises(PluginError, match=re.escape(named)) as err:
        mathml.tex_to_mathml(tex, display=False, where="metrics.md")
    assert "metrics.md" in str(err.value)


def test_render_replaces_each_arithmatex_wrapper_and_unescapes_its_tex() -> None:
    page = ('<p>If <span class="arithmatex">\\(a &lt; b\\)</span> then</p>\n'
            '<div class="arithmatex">\\[x^2\\]</div><p>$5 stays</p>')
    out = mathml.render(page, "p.md")
    inline, block = re.findall(r'<(span|div) class="arithmatex">(<math.*?</math>)</\1>', out)
    root = _tree(inline[1])
    assert root.get("display") == "inline"
    assert [(e.tag[len(MATHML):], e.text) for e in root.iter() if e.text] == [("mi", "a"), ("mo", "<"), ("mi", "b")]
    root = _tree(block[1])
    assert root.get("display") == "block" and _texts(root, "mi") == ["x"] and _texts(root, "mn") == ["2"]
    assert "\\(" not in out and "\\[" not in out
    assert out.endswith("<p>$5 stays</p>")  # text outside a wrapper is left alone


# --- the built site -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built as ``make docs`` builds it (strict), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _visible_text(page: str) -> str:
    """Text of a page's article, without code, scripts and MathML."""
    body = re.search(r"<article\b.*?</article>", page, re.S)
    assert body, "no <article> in the page"
    text = re.sub(r"<(pre|code|script|style|math)\b.*?</\1>", "", body.group(0), flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def test_every_page_has_its_formulas_as_mathml_and_no_external_resource(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 12
    formulas = 0
    for path in pages:
        page = path.read_text()
        wrappers = re.findall(r'<(span|div) class="arithmatex">(.*?)</\1>', page, re.S)
        for _, inner in wrappers:
            assert inner.startswith("<math ") and inner.endswith("</math>"), (path, inner[:200])
        formulas += len(wrappers)
        if "<article" in page:
            raw = RAW_TEX.findall(_visible_text(page))
            assert not raw, f"{path}: raw TeX left in the text: {raw[:10]}"
        external = EXTERNAL.findall(page)
        assert not external, f"{path}: loads {external} from the internet"
    assert formulas >= 40  # the metric definitions alone hold more
    assert not (site / "_hooks").exists(), "the hook is build code, not a page to publish"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site served on the loopback interface, as a reader's browser gets it (the browser's resource
    timing lists every file a page fetches over HTTP, failed fetches included; it lists no file:// loads)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# Runs after the load event in a copy of the page; reports what the browser made of it.
PROBE_SCRIPT = r"""<script>
window.addEventListener('load', function () {
  var map = Array.prototype.map;
  var article = document.querySelector('article');
  var maths = article.querySelectorAll('math');
  var text = article.cloneNode(true);
  Array.prototype.forEach.call(text.querySelectorAll('pre, code, math, script'), function (e) { e.remove(); });
  var report = {
    wrappers: article.querySelectorAll('.arithmatex').length,
    wrapped: article.querySelectorAll('.arithmatex > math').length,
    maths: map.call(maths, function (m) {
      var r = m.getBoundingClientRect();
      return {display: getComputedStyle(m).display, w: r.width, h: r.height,
              block: m.getAttribute('display') === 'block'};
    }),
    fractions: map.call(article.querySelectorAll('mfrac'), function (f) {
      return {num_bottom: f.children[0].getBoundingClientRect().bottom,
              den_top: f.children[1].getBoundingClientRect().top};
    }),
    text: text.textContent,
    images: map.call(document.images, function (i) {
      return {src: i.getAttribute('src'), complete: i.complete, w: i.naturalWidth, h: i.naturalHeight};
    }),
    resources: map.call(performance.getEntriesByType('resource'), function (e) { return e.name; })
  };
  var pre = document.createElement('pre');
  pre.id = 'docs-probe';
  pre.textContent = JSON.stringify(report);
  document.body.appendChild(pre);
});
</script>"""


def _probe(site: Path, origin: str, name: str, tmp_path: Path) -> dict[str, Any]:
    """Open ``<name>/index.html`` of the served site (a copy with the probe script, in the same folder so relative
    links hold) in headless Chromium and return the probe's report."""
    page = site / name / "index.html"
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE_SCRIPT + "</body>"))
    return chromium_probe(f"{origin}/{name}/probe.html", "docs-probe", tmp_path, profile=f"profile-{name}")


def _check_rendered(report: dict[str, Any], origin: str, name: str) -> None:
    # every formula arithmatex found is a MathML element that the browser laid out as math
    assert report["wrapped"] == report["wrappers"] == len(report["maths"]), name
    for m in report["maths"]:
        assert "math" in m["display"] and m["w"] > 0 and m["h"] > 0, (name, m)
    # a fraction's numerator sits above its denominator (side by side if MathML were not laid out)
    for f in report["fractions"]:
        assert f["num_bottom"] <= f["den_top"] + 0.5, (name, f)
    raw = RAW_TEX.findall(report["text"])
    assert not raw, f"{name}: raw TeX left in the text: {raw[:10]}"
    for img in report["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, (name, img)
    # every file the page loaded came from the built site itself
    assert report["resources"], name
    remote = [u for u in report["resources"] if not u.startswith(origin + "/")]
    assert not remote, f"{name} fetched {remote}"


@pytest.mark.skipif(chromium() is None, reason="no chromium/chrome binary on PATH (Debian: apt-get install -y "
                    "chromium, as `make browser` does); the headless-browser check of the docs needs one")
def test_metric_definitions_and_quickstart_render_in_headless_chromium(site: Path, served: str,
                                                                       tmp_path: Path) -> None:
    metrics = _probe(site, served, "auditing_metrics", tmp_path)
    _check_rendered(metrics, served, "auditing_metrics")
    assert len(metrics["maths"]) >= 40, len(metrics["maths"])
    assert sum(m["block"] for m in metrics["maths"]) >= 5
    assert len(metrics["fractions"]) >= 5
    quick = _probe(site, served, "quickstart", tmp_path)
    _check_rendered(quick, served, "quickstart")
    assert [i["src"] for i in quick["images"]] == ["../img/fig1_gradcam_grid.png"]
