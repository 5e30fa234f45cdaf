"""Every shell script of the project passes shellcheck (setup, test, demos, CI, the
package's build and maintainer scripts, the SysV script)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scripts() -> list[Path]:
    found = [*ROOT.glob("*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / ".ci" / "run",
             *ROOT.glob("packaging/deb/*.sh")]
    found += [ROOT / "packaging" / "deb" / name
              for name in ("postinst", "prerm", "postrm", "appliance.init")]
    return sorted(found)


def test_shellcheck_is_clean() -> None:
    listed = scripts()
    assert len(listed) >= 10 and all(path.is_file() for path in listed), listed
    result = subprocess.run(["shellcheck", "--severity=info", *map(str, listed)],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
