"""Print the README quickstart's commands, one per line: the first ```bash block under '## Quickstart'.

CI runs exactly these lines, so the README and CI cannot drift apart.
"""

import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
section = text.split("\n## Quickstart", 1)[1]
block = section.split("```bash\n", 1)[1].split("```", 1)[0]
commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
if len(commands) != 2:
    sys.exit(f"the README quickstart should hold exactly two commands, found {len(commands)}: {commands}")
print("\n".join(commands))
