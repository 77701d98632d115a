"""MkDocs hooks.

* The library's docstrings cite other names as ``:func:`cif_jax.x` ``; mkdocstrings
  renders the backticked part as code and leaves the role's prefix as text. The
  prefix is dropped, so the reference reads as code.
* The figures that the experiments and benchmarks commit beside their results
  (``experiments/results/*.png``, ``benchmarks/results/*.png``) are added to the
  site as they are, and each of those two pages ends with all of its folder's
  figures: a new result shows up without editing the docs.
"""

import glob
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):(?=<code>)")
GALLERIES = {"experiments.md": "experiments/results", "benchmarks.md": "benchmarks/results"}


def _figures(folder):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, folder, "*.png")))


def on_files(files, config, **kwargs):
    for folder in GALLERIES.values():
        for path in _figures(folder):
            files.append(File(path, ROOT, config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, **kwargs):
    folder = GALLERIES.get(page.file.src_uri)
    if folder is None:
        return markdown
    lines = [markdown.rstrip(), "", "## Figures", "",
             f"Every figure in `{folder}/`, as committed (the JSON beside each says which run made it).", ""]
    for path in _figures(folder):
        name = os.path.splitext(os.path.basename(path))[0]
        lines += [f"### {name}", "", f"![{name}]({path})", ""]
    return "\n".join(lines)


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)
