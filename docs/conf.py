"""Sphinx configuration of the teachx documentation (Markdown pages through MyST, API pages from docstrings)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TEACHX_THREADS", "1")

project = "teachx"
author = "teachx developers"
copyright = "2026, teachx developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# teachx's docstrings name code with double backticks and roles; nitpicky cross-reference checks would flag
# every third-party type (torch.Tensor, numpy.ndarray) that has no inventory offline
nitpicky = False

html_theme = "furo"
html_title = "teachx"
html_static_path: list[str] = []
