"""The documentation's code runs and says what the pages show.

* ``docs/getting-started.md`` is run as it stands (its python blocks, in order, in
  a fresh process) and every line it prints is compared with the page's output
  blocks: text exactly, integers exactly, decimals to 5% (or 1e-3 absolute, for
  solver residuals that sit at float32 rounding).
* The API reference documents every public name of ``cif_jax`` and nothing else.

``mkdocs build --strict`` itself runs in ``.ci/run`` (it needs the ``docs`` extra).
"""

import os
import re
import subprocess
import sys

import pytest

import cif_jax as cj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _same_line(got: str, want: str) -> bool:
    if _NUMBER.sub("#", got) != _NUMBER.sub("#", want):
        return False
    for a, b in zip(_NUMBER.findall(got), _NUMBER.findall(want)):
        if re.fullmatch(r"[-+]?\d+", b):
            if a != b:
                return False
        elif abs(float(a) - float(b)) > 0.05 * abs(float(b)) + 1e-3:
            return False
    return True


def test_getting_started_runs_and_prints_what_it_shows(tmp_path):
    page = open(os.path.join(DOCS, "getting-started.md")).read()
    code = "\n\n".join(_blocks(page, "python"))
    want = [line for block in _blocks(page, "text") for line in block.splitlines()]
    assert len(want) >= 10 and "cj.build_cache" in code
    script = tmp_path / "getting_started.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, "-W", "ignore", str(script)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = run.stdout.splitlines()
    assert len(got) == len(want), (got, want)
    bad = [(g, w) for g, w in zip(got, want) if not _same_line(g, w)]
    assert not bad, bad


def test_line_comparison_can_fail():
    assert _same_line("CiF / IF: 1.030 1.082", "CiF / IF: 1.031 1.080")
    assert not _same_line("CiF / IF: 1.300 1.082", "CiF / IF: 1.030 1.082")
    assert not _same_line("folds: [7, 0]", "folds: [0, 7]")
    assert not _same_line("paper / IF:", "CiF / IF:")


def test_api_reference_documents_every_public_name():
    public = {line.split(" as ")[1].strip() for line in open(os.path.join(ROOT, "cif_jax", "__init__.py"))
              if line.startswith("from cif_jax")}
    documented = []
    for name in sorted(os.listdir(os.path.join(DOCS, "api"))):
        text = open(os.path.join(DOCS, "api", name)).read()
        documented += re.findall(r"^::: cif_jax\.(\w+)$", text, flags=re.M)
    assert len(documented) == len(set(documented)), "a name is documented twice"
    assert set(documented) == public, (sorted(public - set(documented)), sorted(set(documented) - public))
    for name in documented:
        assert getattr(cj, name).__doc__, f"cj.{name} has no docstring"


@pytest.mark.parametrize("page", sorted(p for p in os.listdir(DOCS) if p.endswith(".md")))
def test_snippets_exist(page):
    text = open(os.path.join(DOCS, page)).read()
    for path in re.findall(r'^--8<-- "([^":]+)', text, flags=re.M):
        assert os.path.exists(os.path.join(ROOT, path)), f"{page} includes missing {path}"
