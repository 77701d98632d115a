"""What a reader sees stays clean: math that renders, Returns sections that parse, no internal
words, and the README's main-job table equal to its committed results file.

The source checks read the library's docstrings and the pages as text. The site check builds the
site (``mkdocs build --strict``, about 5 s) into a temporary folder and reads the HTML; it runs
where the ``docs`` extra is installed, as in CI.
"""

import ast
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RST_MATH = re.compile(r"\.\. math::|:math:`")
#: Words only the project's own tracker can resolve.
INTERNAL = re.compile(r"\bissue #\d+|(?<![\w`])#\d+'s\b|\bseed 00\d\b|\(item \d+\)|, items? \d+\)")
#: A Google-style Returns section whose first word the parser would read as a name.
BAD_RETURNS = re.compile(r"Returns:\n\s+(?:A|An) :(?:class|func):")
#: The pages a reader sees: the site's pages, the README and what the site includes.
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md"),
               os.path.join(ROOT, "experiments", "README.md"), os.path.join(ROOT, "examples", "README.md")]
               + glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.md")))


def _docstrings():
    for path in sorted(glob.glob(os.path.join(ROOT, "cif_jax", "**", "*.py"), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield f"{os.path.relpath(path, ROOT)}:{getattr(node, 'name', '<module>')}", doc


def test_docstrings_use_the_math_the_site_renders():
    bad = [where for where, doc in _docstrings() if RST_MATH.search(doc)]
    assert not bad, f"RST math (use $...$ and $$...$$, which arithmatex renders) in: {bad}"


def test_returns_sections_do_not_begin_with_an_article():
    bad = [where for where, doc in _docstrings() if BAD_RETURNS.search(doc)]
    assert not bad, f"'Returns:' followed by 'A :class:' renders as a name/type table in: {bad}"


def test_pages_name_things_by_what_they_are():
    bad = []
    for path in PAGES:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if INTERNAL.search(line):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:80]}")
    assert not bad, "internal references a reader cannot resolve:\n" + "\n".join(bad)


def test_the_checks_can_fail():
    assert RST_MATH.search("    .. math::\n") and RST_MATH.search("the :math:`x` term")
    assert INTERNAL.search("(issue #17)") and INTERNAL.search("#17's target") and INTERNAL.search("seed 002")
    assert not INTERNAL.search("`#17` in a list") and not INTERNAL.search("seed 0 and seed 10")
    assert BAD_RETURNS.search("Returns:\n    A :class:`X`, with timings")


def _readme_table():
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = [line for line in f if line.startswith("| folds on themselves") or line.startswith("| cross-fold")
                or line.startswith("| held-out points")]
    return rows


def test_readme_main_job_table_is_its_committed_file():
    with open(os.path.join(ROOT, "experiments", "results", "main-job-digits-lenet5.json")) as f:
        run = json.load(f)
    rows = _readme_table()
    assert len(rows) == 5, rows
    f3 = lambda x: f"{x:.3f}"
    for k, row in zip((50, 100), rows[:2]):
        est = next(r for r in run["per_k"] if r["K"] == k)["estimators"]
        h, p = est["hybrid"], est["paper"]
        want = (f"{f3(h['pearson']['value'])} [{f3(h['pearson']['low'])}, {f3(h['pearson']['high'])}] / "
                f"{f3(h['spearman']['value'])} [{f3(h['spearman']['low'])}, {f3(h['spearman']['high'])}] | "
                f"{f3(p['pearson']['value'])} / {f3(p['spearman']['value'])}")
        assert want in row, (row, want)
    for k, row in zip((50, 100), rows[2:4]):
        est = next(r for r in run["per_k"] if r["K"] == k)["estimators"]
        h, p = est["hybrid"]["cross_fold"], est["paper"]["cross_fold"]
        want = f"{f3(h['pearson'])} / {f3(h['spearman'])} | {f3(p['pearson'])} / {f3(p['spearman'])}"
        assert want in row, (row, want)
    h, p = run["held_out"]["estimators"]["hybrid"], run["held_out"]["estimators"]["paper"]
    want_h = f"Spearman {f3(h['median_spearman'])} (10-90%: {f3(h['spearman_q10'])}-{f3(h['spearman_q90'])})"
    want_p = f"Spearman {f3(p['median_spearman'])} ({p['spearman_q10']:.2f}-{p['spearman_q90']:.2f})"
    assert want_h in rows[4] and want_p in rows[4], (rows[4], want_h, want_p)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the site needs the docs extra")
def test_built_site_has_no_raw_math_garbled_returns_or_internal_words(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    bad = []
    for path in glob.glob(os.path.join(tmp_path, "**", "*.html"), recursive=True):
        with open(path) as f:
            html = f.read()
        text = re.sub(r"<[^>]+>", "", html)
        where = os.path.relpath(path, tmp_path)
        if RST_MATH.search(text):
            bad.append(f"{where}: raw RST math")
        if re.search(r"<td>\s*<code>\s*An?\s*</code>\s*</td>", html):
            bad.append(f"{where}: a Returns row named 'A'/'An'")
        for m in INTERNAL.finditer(text):
            bad.append(f"{where}: {m.group(0)!r}")
    assert not bad, bad
    assert glob.glob(os.path.join(tmp_path, "**", "*.html"), recursive=True)
    with open(os.path.join(tmp_path, "api", "cache", "index.html")) as f:
        assert 'class="arithmatex"' in f.read()  # math reaches MathJax
