"""Print the README's set-up command number N (1: install + demo, 2: tests).

The README marks them with <!-- setup:install --> and <!-- setup:test --> right before a
```bash block; CI runs exactly what a new user copies.
"""

import re
import sys
from pathlib import Path

which = {"install": "setup:install", "test": "setup:test"}[sys.argv[1]]
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
m = re.search(r"<!-- " + re.escape(which) + r" -->\s*```(?:bash|sh|console)?\n(.*?)```", text, re.S)
if not m:
    sys.exit(f"README.md has no <!-- {which} --> code block")
print(m.group(1).strip())
