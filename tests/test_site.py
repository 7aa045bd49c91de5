"""The documentation site, built once with mkdocs (the `docs` extra; skipped without it).

* A page loads nothing from another host: every script, stylesheet, font, image and frame it needs
  is a file of the site, and every one of them exists. Hyperlinks to papers and repositories are
  not loads and may point anywhere.
* Every formula is typeset when the site is built (MathML, in the font the site carries): no page
  shows raw TeX, and none needs a script or a network to draw its math.
* The build refuses a formula it cannot typeset, rather than showing its TeX.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "docs" / "mkdocs.yml"
HOOK = REPO / "docs" / "hooks" / "mathml.py"

# The `docs` extra, by import name.
DOCS_EXTRA = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "latex2mathml", "ziamath")

# A URL with a scheme (https:, ftp:, ...) or protocol-relative (//host/...) is on another host,
# except data: URLs, which carry their content.
EXTERNAL = re.compile(r"^\s*(//|(?!data:)[a-z][a-z0-9+.-]*:)", re.I)
# The attributes through which an element makes the browser fetch something.
LOADING_ATTRIBUTES = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "input": ("src",),
}
# <link rel=...> values that only name another document; any other rel (stylesheet, icon, preload,
# preconnect, manifest, ...) makes the browser fetch or connect.
NAVIGATION_RELS = {"canonical", "alternate", "author", "help", "license", "next", "prev", "me", "search"}
CSS_URL = re.compile(r"""url\(\s*(['"]?)(.*?)\1\s*\)|@import\s+(['"])(.*?)\3""", re.I)
TEX_COMMAND = re.compile(r"\\[A-Za-z]{2,}|\\[()[\]]")


def missing_docs_packages() -> list[str]:
    missing = []
    for name in DOCS_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


pytestmark = pytest.mark.skipif(
    bool(missing_docs_packages()), reason=f"the docs extra is not installed ({missing_docs_packages()})"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as `make docs` builds it (strict), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(CONFIG),
            "--site-dir",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def pages(site: Path) -> list[Path]:
    found = sorted(site.rglob("*.html"))
    assert len(found) > 10, found
    return found


class Resources(HTMLParser):
    """The URLs an HTML page loads (not the ones it links to), the CSS inside it, and its visible text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str]] = []
        self.css: list[str] = []
        self.text: list[str] = []
        self._hidden = 0
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        loads = tag != "link" or not set(values.get("rel", "").lower().split()) <= NAVIGATION_RELS
        for name in LOADING_ATTRIBUTES.get(tag, ()):
            if loads and name in values:
                for url in values[name].split(",") if name.endswith("srcset") else [values[name]]:
                    self.urls.append((f"<{tag} {name}>", url.strip().split(" ")[0]))
        if "style" in values:
            self.css.append(values["style"])
        # Code is shown as written; the math elements hold what the hook typeset.
        if tag in ("code", "pre", "script", "style", "math"):
            self._hidden += 1
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("code", "pre", "script", "style", "math"):
            self._hidden -= 1
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.css.append(data)
        elif not self._hidden:
            self.text.append(data)


def parse(page: Path) -> Resources:
    parser = Resources()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    return parser


def css_urls(css: str) -> list[str]:
    return [match[2] or match[4] for match in CSS_URL.finditer(css)]


def names_a_file(url: str) -> bool:
    return bool(url) and not EXTERNAL.match(url) and not url.startswith(("#", "data:"))


def local_file(base: Path, url: str, site: Path) -> Path:
    path = unquote(urlsplit(url).path)
    target = (site / path.lstrip("/")) if path.startswith("/") else (base.parent / path)
    return target / "index.html" if url.endswith("/") else target


def test_pages_load_nothing_from_another_host(site):
    external = []
    for page in pages(site):
        parsed = parse(page)
        loads = parsed.urls + [("css", url) for css in parsed.css for url in css_urls(css)]
        external += [f"{page.relative_to(site)}: {how} {url}" for how, url in loads if EXTERNAL.match(url)]
    assert not external, "\n".join(external)


def test_stylesheets_load_nothing_from_another_host(site):
    external = [
        f"{sheet.relative_to(site)}: {url}"
        for sheet in sorted(site.rglob("*.css"))
        for url in css_urls(sheet.read_text(encoding="utf-8"))
        if EXTERNAL.match(url)
    ]
    assert not external, "\n".join(external)


def test_every_file_a_page_loads_is_in_the_site(site):
    missing = []
    for page in pages(site):
        parsed = parse(page)
        for how, url in parsed.urls:
            if names_a_file(url) and not local_file(page, url, site).is_file():
                missing.append(f"{page.relative_to(site)}: {how} {url}")
    for sheet in sorted(site.rglob("*.css")):
        for url in css_urls(sheet.read_text(encoding="utf-8")):
            if names_a_file(url) and not local_file(sheet, url, site).is_file():
                missing.append(f"{sheet.relative_to(site)}: {url}")
    assert not missing, "\n".join(missing)


def test_scripts_of_our_own_name_no_other_host(site):
    # The theme's scripts (assets/) mention URLs in comments and behind the switches that the next
    # test keeps off; scripts added to the site itself must not name any host at all.
    own = [path for path in site.rglob("*.js") if path.relative_to(site).parts[0] not in ("assets", "search")]
    external = [
        f"{path.relative_to(site)}: {url}"
        for path in own
        for url in re.findall(r"""["'`]((?:https?:)?//[^"'`]+)""", path.read_text(encoding="utf-8"))
    ]
    assert not external, "\n".join(external)


def test_the_themes_remote_loaders_stay_off(site):
    # mkdocs-material fetches a script for Mermaid diagrams, and the repository's stars and version
    # from the GitHub API when `repo_url` is set: neither may be on a page.
    for page in pages(site):
        text = page.read_text(encoding="utf-8")
        assert 'class="mermaid"' not in text, page
        assert 'data-md-component="source"' not in text, (
            f"{page}: repo_url makes the page call the GitHub API"
        )


def test_every_formula_is_typeset_at_build_time(site):
    untypeset = []
    for page in pages(site):
        text = "".join(parse(page).text)
        untypeset += [f"{page.relative_to(site)}: {match!r}" for match in TEX_COMMAND.findall(text)]
    assert not untypeset, "\n".join(untypeset[:20])
    rules = (site / "rules" / "index.html").read_text(encoding="utf-8")
    assert rules.count('<math xmlns="http://www.w3.org/1998/Math/MathML"') > 100
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">' in rules


def test_the_math_font_is_in_the_site(site):
    font = site / "fonts" / "STIXTwoMath-Regular.ttf"
    # An OpenType font (TrueType outlines), not a placeholder.
    assert font.read_bytes()[:4] == b"\x00\x01\x00\x00"
    assert font.stat().st_size > 100_000


# --------------------------------------------------------------------------
# The hook that typesets the formulas
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mathml_hook", HOOK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("tex", "why"),
    [
        (r"\nosuchcommand x", "does not know"),
        (r"\frac{a}", "argument is missing"),
        (r"x^", "cannot read"),
        (r"a & b", "malformed"),
    ],
)
def test_the_hook_refuses_what_it_cannot_typeset(hook, tex, why):
    with pytest.raises(ValueError, match=why):
        hook.to_mathml(tex, display=False)


def test_the_hook_typesets_as_tex_does(hook):
    # \hat is an accent over its symbol, in the spacing circumflex that math fonts shape as one.
    assert '<mover accent="true"><mi>m</mi><mo stretchy="false">\u02c6</mo></mover>' in hook.to_mathml(
        r"\hat m", display=False
    )
    # A norm's bars keep their size under a superscript; \left( ... \right) still grows.
    norm = hook.to_mathml(r"\lVert x \rVert^2 \left( \frac12 \right)", display=True)
    assert norm.count('<mo stretchy="false">\u2016</mo>') == 2
    assert norm.count('stretchy="true"') == 2
    # amsmath's aligned environment is laid out as split: a table, with no stray "&".
    aligned = hook.to_mathml(r"\begin{aligned} a &= b \\ c &= d \end{aligned}", display=True)
    assert aligned.count("<mtr>") == 2 and "&" not in aligned


def test_a_page_with_a_formula_the_hook_cannot_typeset_fails_the_build(hook):
    from mkdocs.exceptions import PluginError

    class Page:
        class file:
            src_uri = "broken.md"

    with pytest.raises(PluginError, match=r"broken\.md.*\\nosuchcommand"):
        hook.on_page_content(r'<p><span class="arithmatex">\(\nosuchcommand\)</span></p>', page=Page())
