"""The README's next steps are what the demo prints at its end (with the demo's defaults)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_next_steps_equal_the_demos() -> None:
    demo = (ROOT / "scripts" / "demo-node.sh").read_text()
    listen = re.search(r'^listen=\$\{[A-Z_]+:-([^}]+)\}', demo, re.MULTILINE)
    data = re.search(r'^data=\$\{[A-Z_]+:-([^}]+)\}', demo, re.MULTILINE)
    assert listen and data, "the demo's defaults for listen= and data= moved"
    printed = demo.split("== next", 1)[1].split("\nEOF", 1)[0]
    steps = [line.strip() for line in printed.splitlines() if line.startswith("    ")]
    values = {"$APPLIANCE_URL": f"http://{listen.group(1)}",
              "$APPLIANCE_TOKEN_FILE": f"{data.group(1)}/token", "\\$": "$"}
    for name, value in values.items():
        steps = [step.replace(name, value) for step in steps]
    readme = (ROOT / "README.md").read_text()
    block = readme.split("prints what to try next:", 1)[1].split("```sh\n", 1)[1]
    assert block.split("```", 1)[0].splitlines() == steps
