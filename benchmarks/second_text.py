"""Write a second English evaluation text (not WikiText) that every machine with CPython already has.

    python benchmarks/second_text.py --out runs/python-reference.txt
    quept eval --text runs/python-reference.txt --precision all --method quept,rtn --max-tokens 32768

The text is the Python language reference's help topics as CPython ships them (`pydoc_data.topics`,
about 460 kB of English technical prose with code examples; PSF licence), joined in sorted topic order.
Its SHA-256 and the Python version are printed: a table measured on it names both, since the topics
change between Python releases.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
from pathlib import Path
from pydoc_data.topics import topics


def reference_text() -> str:
    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="file to write the text to")
    args = parser.parse_args()
    data = reference_text().encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"{args.out}: {len(data)} bytes, Python {platform.python_version()} pydoc_data.topics, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
