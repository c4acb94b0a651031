"""The README's ```python snippets run, in order, in one namespace (as a reader would).
```py blocks need a launcher (distributed training); test_ecosystem.py runs that code."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["report"].fused and namespace["error"] > 0
