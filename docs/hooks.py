"""MkDocs hooks of the medxfer site (mkdocs.yml: ``hooks``).

medxfer's docstrings cross-reference in Sphinx style (:func:`name`); mkdocstrings renders the name as code and
leaves the role in front of it. The role is dropped, so the API pages read as the docstrings mean.
"""

import re

SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|mod|meth|attr|class|data|obj|exc|const):(?=<code>)")


def on_page_content(html, **kwargs):
    return SPHINX_ROLE.sub("", html)
