# Sphinx configuration of everest-agent's documentation.
# Build: pip install -e '.[docs]' && sphinx-build -W -b html docs docs/_build/html
# (-W: a warning, such as a broken reference, fails the build.)

import os
import re

_here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_here, os.pardir, "everest_agent", "__init__.py"), encoding="utf-8") as _f:
    release = re.search(r'__version__ = "([^"]+)"', _f.read()).group(1)
version = release

project = "everest-agent"
author = "the everest-agent authors"
copyright = "the everest-agent authors"

extensions = []
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = True

html_theme = "alabaster"
html_title = f"everest-agent {release}"
html_static_path = []
html_show_sourcelink = False
