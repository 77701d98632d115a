"""MkDocs hooks.

* The library's docstrings cite other names as ``:func:`cif_jax.x` ``; mkdocstrings
  renders the backticked part as code and leaves the role's prefix as text. The
  prefix is dropped, so the reference reads as code.
* Inline code that names a public object (``cj.build_cache``, ``cif_jax.CG``, also
  with a member: ``cj.CG.prepare``) links to its entry in the API reference, on
  every page: the reference is read from ``docs/api/*.md``.
* The figures that the experiments and benchmarks commit beside their results
  (``experiments/results/*.png``, ``benchmarks/results/*.png``) are added to the
  site as they are, and each of those two pages ends with all of its folder's
  figures: a new result shows up without editing the docs.
* On the Benchmarks page, each results file included with ``--8<--`` is inlined with
  its headings one level down, so that the page has one title and each file is a
  section of it in the contents panel.
"""

import glob
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):(?=<code>)")
GALLERIES = {"experiments.md": "experiments/results", "benchmarks.md": "benchmarks/results"}
#: Pages that include several results files, each with its own title, under a title of their own.
DEMOTE = {"benchmarks.md"}


def _figures(folder):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, folder, "*.png")))


def on_files(files, config, **kwargs):
    for folder in GALLERIES.values():
        for path in _figures(folder):
            files.append(File(path, ROOT, config["site_dir"], config["use_directory_urls"]))
    return files


_SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)


def _demoted(path):
    """A results file's text with every heading one level down (its title becomes a section)."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out)


def on_page_markdown(markdown, page, **kwargs):
    folder = GALLERIES.get(page.file.src_uri)
    if folder is None:
        return markdown
    if page.file.src_uri in DEMOTE:
        # The page has its own title; each included results file becomes one section of it.
        markdown = _SNIPPET.sub(lambda m: _demoted(m.group(1)), markdown)
    lines = [markdown.rstrip(), "", "## Figures", "",
             f"Every figure in `{folder}/`, as committed (the JSON beside each says which run made it).", ""]
    for path in _figures(folder):
        name = os.path.splitext(os.path.basename(path))[0]
        lines += [f"### {name}", "", f"![{name}]({path})", ""]
    return "\n".join(lines)


_CODE = re.compile(r"<code>(?:cj|cif_jax)\.([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)?)(\(\))?</code>")


def _api_pages():
    """``{public name: page url}`` from the ``::: cif_jax.NAME`` lines of ``docs/api/*.md``."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "docs", "api", "*.md")):
        with open(path) as f:
            for name in re.findall(r"^::: cif_jax\.(\w+)$", f.read(), flags=re.M):
                out[name] = f"api/{os.path.splitext(os.path.basename(path))[0]}/"
    return out


def on_page_content(html, page, **kwargs):
    html = _ROLE.sub("", html)
    pages = _api_pages()
    up = "../" * page.url.count("/")

    def link(match):
        name = match.group(1)
        start = match.start()
        if name not in pages or html.rfind("<a ", 0, start) > html.rfind("</a>", 0, start):
            return match.group(0)  # not public, or already inside a link
        return f'<a href="{up}{pages[name]}#cif_jax.{name}">{match.group(0)}</a>'

    return _CODE.sub(link, html)
