"""MkDocs hook: the TeX that ``pymdownx.arithmatex`` finds on a page becomes MathML when the site is built.

The browser lays MathML out natively (Chromium 109+, Firefox, Safari), so a page shows its formulas with no
script, font file or network access at view time. arithmatex (``generic: true``) marks inline math as
``<span class="arithmatex">\\(...\\)</span>`` and display math as ``<div class="arithmatex">\\[...\\]</div>``,
HTML-escaped; :func:`render` replaces each TeX string by the ``<math>`` element ``latex2mathml`` makes of it,
inside the same wrapper. Two repairs bring latex2mathml's output closer to TeX: ``\\_`` (``\\#``, ...) inside
``\\text{}`` prints without its backslash, and a delimiter not sized by ``\\left``/``\\right`` does not stretch.
TeX that ``latex2mathml`` cannot parse, or parses with a command left over as text, stops the build with the page
and the formula.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*\\(?P<delim>[(\[])(?P<tex>.*?)\\[)\]]\s*</(?P=tag)>', re.S
)
MTEXT = re.compile(r"(<mtext\b[^>]*>)(.*?)(</mtext>)", re.S)
TEXT_ESCAPE = re.compile(r"\\([_#%$]|&amp;)")  # latex2mathml keeps the backslash of \_ (etc.) inside \text{}
PLAIN_MO = "<mo>"  # an operator latex2mathml wrote with no attribute: neither \left/\right nor sized
TAG = re.compile(r"<[^>]+>")
TEX_COMMAND = re.compile(r"\\[A-Za-z]+")


def tex_to_mathml(tex: str, display: bool, where: str = "<string>") -> str:
    """MathML of one TeX formula.

    Parameters
    ----------
    tex : the formula, without delimiters and not HTML-escaped
    display : a display (block) formula rather than an inline one
    where : the page, named in the error

    Returns
    -------
    ``<math ...>...</math>``.

    Raises
    ------
    PluginError
        When ``latex2mathml`` cannot convert ``tex``, or leaves a TeX command (``\\name``) in the text.
    """
    try:
        mathml = convert(tex, display="block" if display else "inline")
    except Exception as err:  # latex2mathml raises several unrelated types on malformed TeX
        raise PluginError(f"{where}: cannot convert the formula {tex!r} to MathML ({type(err).__name__}: "
                          f"{err}); expected TeX that latex2mathml supports") from err
    mathml = MTEXT.sub(lambda m: m.group(1) + TEXT_ESCAPE.sub(r"\1", m.group(2)) + m.group(3), mathml)
    # As in TeX, only \left, \right and sized delimiters grow; MathML's operator dictionary would stretch a plain
    # fence such as \lVert (U+2016) or "/" to the height of its row (e.g. next to a display-size sum).
    mathml = mathml.replace(PLAIN_MO, '<mo stretchy="false">')
    left = TEX_COMMAND.findall(html.unescape(TAG.sub("", mathml)))
    if left:
        raise PluginError(f"{where}: the formula {tex!r} keeps {', '.join(left)} as raw text: latex2mathml "
                          "does not know that command; write it with one it supports")
    return mathml


def render(page_html: str, where: str = "<string>") -> str:
    """``page_html`` with every arithmatex formula replaced by its MathML, inside the same wrapper element."""

    def one(m: re.Match[str]) -> str:
        mathml = tex_to_mathml(html.unescape(m.group("tex")), m.group("delim") == "[", where)
        return f'<{m.group("tag")} class="arithmatex">{mathml}</{m.group("tag")}>'

    return ARITHMATEX.sub(one, page_html)


def on_page_content(page_html: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: runs on each page's HTML body after Markdown conversion."""
    return render(page_html, page.file.src_uri)
