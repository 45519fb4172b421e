"""Print the lowest versions pyproject.toml allows, one `name==version` a line, for `make test-oldest`.

Each dependency's `>=` (or `~=`, `==`) bound becomes an exact pin; one without a lower bound is an error
(an honest lower bound is one the suite has passed with). Extras named with `--extra` are included.
Transitive dependencies stay free: pip picks their newest compatible release.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version


def lowest_pins(requirements: list[str]) -> list[str]:
    """`name==lowest` for each requirement string; raises ValueError naming one without a lower bound."""
    pins = []
    for text in requirements:
        requirement = Requirement(text)
        lows = [s.version for s in requirement.specifier if s.operator in (">=", "~=", "==")]
        if not lows:
            raise ValueError(f"{text!r} has no lower bound: pyproject.toml must say which version was tested")
        pins.append(f"{requirement.name}=={max(lows, key=Version)}")
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependency group to include")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in args.extra:
        requirements += project.get("optional-dependencies", {})[extra]
    try:
        print("\n".join(lowest_pins(requirements)))
    except ValueError as err:
        print(f"lowest_versions: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
