"""Print pip constraints pinning every dependency of pyproject.toml (test extra included) to its declared floor.

`name>=X` becomes `name==X` (environment markers kept), so installing with
`-c` gives the lowest versions the project claims to support for its direct
dependencies; pip resolves the rest.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))["project"]
requirements = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
for requirement in requirements:
    spec, _, marker = requirement.partition(";")
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([^,\s]+)\s*", spec)
    if not match:
        sys.exit(f"no '>=' floor to pin in {requirement!r}")
    name = match.group(1).split("[")[0]
    print(f"{name}=={match.group(2)}" + (f"; {marker.strip()}" if marker.strip() else ""))
