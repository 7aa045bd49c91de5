"""Typeset the site's formulas when it is built, as MathML, so that reading it needs no script and no network.

`pymdownx.arithmatex` (generic mode) leaves each formula of the pages and of the docstrings as TeX in
`<span class="arithmatex">\\(...\\)</span>` or `<div class="arithmatex">\\[...\\]</div>`. This hook
replaces that TeX by the MathML that `latex2mathml` makes of it, which browsers draw themselves: the site
runs no script for its math. A formula that cannot be typeset faithfully (a command that `latex2mathml`
does not know, markup it gets wrong) stops the build with its page and its source, rather than showing
raw TeX to the reader.

MathML needs a font with an OpenType MATH table to stretch roots, fences and braces; many systems have
none, so the site carries STIX Two Math (SIL Open Font License), taken from the `ziamath` package, and
`stylesheets/mathml.css` names it.
"""

from __future__ import annotations

import html
import importlib.util
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from latex2mathml.converter import convert
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

FONT = "fonts/STIXTwoMath-Regular.ttf"

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>',
    re.DOTALL,
)
# A command that latex2mathml does not know, which it leaves in the output as text.
_COMMAND = re.compile(r"\\[A-Za-z]+")
_MATHML = "{http://www.w3.org/1998/Math/MathML}"
ElementTree.register_namespace("", _MATHML[1:-1])
# Elements whose content is text only; latex2mathml nests markup in them for \mathrel{...} and the like.
_TOKENS = {_MATHML + name for name in ("mi", "mn", "mo", "ms", "mtext")}
# How many children each layout element takes: latex2mathml leaves one out for `\frac{a}` and the like.
_ARITY = {_MATHML + name: 2 for name in ("mfrac", "mroot", "msub", "msup", "munder", "mover")}
_ARITY |= {_MATHML + name: 3 for name in ("msubsup", "munderover")}
# TeX's accents over one symbol (\hat, \bar, ...), as the spacing characters that math fonts shape as
# accents; latex2mathml writes some as ASCII (a caret drawn full size) and some as stretchy limits.
_ACCENTS = {"^": "\u02c6", "~": "\u02dc"} | {mark: mark for mark in "\u00af\u02d9\u00a8\u02c7"}
# Delimiters that TeX draws at their natural size unless \left, \right or \big asks otherwise; MathML
# stretches them by default, so latex2mathml's \lVert x \rVert^2 would grow with its superscript.
_DELIMITERS = set("()[]{}|/\u2016\u2223\u2225\u27e8\u27e9\u230a\u230b\u2308\u2309")
# amsmath environments that latex2mathml knows under another name with the same layout.
_SYNONYMS = {r"\begin{aligned}": r"\begin{split}", r"\end{aligned}": r"\end{split}"}


def to_mathml(tex: str, display: bool) -> str:
    """The MathML of one formula, or ValueError saying why it cannot be trusted."""
    for name, synonym in _SYNONYMS.items():
        tex = tex.replace(name, synonym)
    try:
        mathml = convert(tex, display="block" if display else "inline")
    except Exception as error:  # latex2mathml raises bare exceptions of its own for bad TeX
        raise ValueError(f"latex2mathml cannot read it ({type(error).__name__}: {error})") from error
    try:
        root = ElementTree.fromstring(mathml)
    except ElementTree.ParseError as error:
        raise ValueError(f"latex2mathml wrote malformed MathML ({error})") from error
    for element in root.iter():
        if element.tag == _MATHML + "mover" and len(element) == 2 and element[0].tag in _TOKENS:
            accent = element[1]
            if accent.tag == _MATHML + "mo" and (accent.text or "") in _ACCENTS:
                element.set("accent", "true")
                accent.set("stretchy", "false")
                accent.text = _ACCENTS[accent.text or ""]
        if (
            element.tag == _MATHML + "mo"
            and (element.text or "") in _DELIMITERS
            and not {"stretchy", "minsize", "maxsize"} & set(element.attrib)
        ):
            element.set("stretchy", "false")
        if element.tag in _TOKENS and len(element):
            element.text = "".join(element.itertext())
            element[:] = []
        if element.tag in _ARITY and len(element) != _ARITY[element.tag]:
            raise ValueError(f"an argument is missing: {element.tag[len(_MATHML) :]} has {len(element)}")
        if _COMMAND.search(element.text or ""):
            raise ValueError(f"latex2mathml does not know the command in {element.text!r}")
    return ElementTree.tostring(root, encoding="unicode", short_empty_elements=False)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """Replace the TeX of every formula of the page by its MathML."""

    def typeset(match: re.Match[str]) -> str:
        tex = html.unescape(match["tex"])
        try:
            mathml = to_mathml(tex, display=match["open"] == "\\[")
        except ValueError as error:
            raise PluginError(f"{page.file.src_uri}: cannot typeset the formula {tex!r}: {error}") from error
        return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'

    return _FORMULA.sub(typeset, html_text)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the math font to the site, from the installed `ziamath` package (the `docs` extra)."""
    # Found, not imported: only the font file is wanted, not ziamath's code.
    package = importlib.util.find_spec("ziamath")
    if package is None or not package.submodule_search_locations:
        raise PluginError("the math font comes from ziamath: pip install -e '.[docs]'")
    font = Path(package.submodule_search_locations[0], FONT)
    if not font.is_file():
        raise PluginError(f"ziamath no longer ships {FONT}: hooks/mathml.py must take the font elsewhere")
    files.append(File.generated(config, FONT, abs_src_path=str(font)))
    return files
