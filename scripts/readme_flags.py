"""Write the README's table of every command and its flags, from the parsers themselves.

    python scripts/readme_flags.py          # rewrites the table between the markers in README.md

tests/test_cli.py checks that the README holds exactly what this writes.
"""

import re
from pathlib import Path

from mlx_skipless.cli import flag_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- flags: written by scripts/readme_flags.py -->", "<!-- /flags -->"


def main():
    text = README.read_text()
    block = f"{START}\n{flag_table()}{END}"
    new, n = re.subn(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"README.md needs one {START} ... {END} block")
    README.write_text(new)


if __name__ == "__main__":
    main()
