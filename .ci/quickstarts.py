"""Print README.md's ```python blocks as one script (the quick starts), for the wheel check.

``.ci/run`` installs the built wheel into a fresh virtual environment outside the source tree
and runs this script's output there, so a file missing from the wheel fails CI. The script
first checks that ``functional_ema`` is imported from that environment, not from a checkout.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


README = Path(__file__).resolve().parent.parent / "README.md"
GUARD = """import functional_ema, pathlib, sys
installed = pathlib.Path(functional_ema.__file__).resolve()
assert "site-packages" in installed.parts, f"functional_ema imported from {installed}"
print(f"functional_ema {functional_ema.__version__} from {installed.parent}")
"""

blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
if not blocks:
    sys.exit("README.md has no python blocks")
print(GUARD)
for index, block in enumerate(blocks, 1):
    print(f"# --- README python block {index} ---")
    print(block)
print(f'print("README quick starts: {len(blocks)} blocks ran")')
