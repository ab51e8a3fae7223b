"""Print the transformers requirement of pyproject.toml (`spec`) or its lower bound (`oldest`): the two releases
scripts/test.sh tests are the newest release this requirement allows and the oldest it allows."""

import re
import sys
from pathlib import Path

text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
match = re.search(r'"transformers(\s*[<>=!~][^"]*)"', text)
if match is None:
    sys.exit("scripts/transformers_range.py: pyproject.toml declares no transformers requirement")
spec = match.group(1).replace(" ", "")
lower = re.search(r">=\s*([0-9][^,]*)", spec)
if len(sys.argv) != 2 or sys.argv[1] not in ("spec", "oldest"):
    sys.exit("usage: python scripts/transformers_range.py spec|oldest")
if sys.argv[1] == "spec":
    print(f"transformers{spec}")
elif lower is None:
    sys.exit(f"scripts/transformers_range.py: the requirement 'transformers{spec}' has no >= lower bound")
else:
    version = lower.group(1)
    print(version + ".0" * (2 - version.count(".")))  # "5.23" -> "5.23.0"
