"""MkDocs hooks: render the Sphinx roles of the docstrings as plain code.

The library's docstrings cite other names as ``:func:`cif_jax.x` ``; mkdocstrings
renders the backticked part as code and leaves the role's prefix as text. The
prefix is dropped here, so the reference reads as code.
"""

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):(?=<code>)")


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)
