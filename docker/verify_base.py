"""Check that a container's base image ships the versions backends/versions.py pins, at image build time.

    python3 verify_base.py [--python 3.11] [--require DIST==VER ...] [--optional DIST[|ALT]==VER ...]
                           [--torch-build cpu|cuda=12.9|hip=7.0] [--constraints FILE]

GPU images take torch, SGLang and the vendor kernels from their base image instead of installing them, so a
base image that moved on must stop the build with a line naming the package, both versions and the fix.
Versions are compared by their release numbers only ("2.14.1+cu129" and "2.14.1" match). ``--constraints``
writes ``dist==installed`` for every package found, so later ``pip install -c FILE`` can never replace the
vendor build. Standard library only: it runs in whatever Python the base image has. Exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys

FIX = "update backends/versions.py (then `python -m ci.generate`) or pick another base image"


def release(version: str) -> tuple[int, ...]:
    """Leading release numbers of a version string: "2.9.0a0+git1c57644" -> (2, 9, 0)."""
    match = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def same_release(installed: str, pinned: str) -> bool:
    """True when ``installed`` has the release of ``pinned`` (compared over the pin's number of parts)."""
    want = release(pinned)
    return release(installed)[: len(want)] == want


def parse_pin(text: str) -> tuple[tuple[str, ...], str]:
    """ "amd-aiter|aiter==0.1.7" -> (("amd-aiter", "aiter"), "0.1.7")."""
    names, sep, version = text.partition("==")
    if not sep or not names or not version:
        raise argparse.ArgumentTypeError(f"expected DIST==VERSION, got {text!r}")
    return tuple(n.strip() for n in names.split("|")), version.strip()


def installed_version(names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_build() -> dict[str, str | None]:
    import torch  # only imported when --torch-build is asked for; creates no device context

    return {"cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}


def check(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """(errors, notes, constraint lines) for the requested checks."""
    errors: list[str] = []
    notes: list[str] = []
    constraints: list[str] = []
    if args.python:
        have = ".".join(str(p) for p in sys.version_info[:3])
        if not same_release(have, args.python):
            errors.append(f"base image has Python {have}, the version table pins {args.python}: {FIX}")
    for pins, required in ((args.require, True), (args.optional, False)):
        for names, pinned in pins:
            found = installed_version(names)
            if found is None:
                if required:
                    errors.append(f"base image lacks {names[0]} (the version table pins {pinned}): {FIX}")
                else:
                    notes.append(f"{names[0]} is not in the base image (optional; pinned {pinned})")
                continue
            name, have = found
            constraints.append(f"{name}=={have}")
            if same_release(have, pinned):
                notes.append(f"{name} {have} matches {pinned}")
            elif required:
                errors.append(f"base image has {name} {have}, the version table pins {pinned}: {FIX}")
            else:
                notes.append(f"warning: {name} {have} differs from the pinned {pinned} (optional)")
    if args.torch_build:
        kind, _, pinned = args.torch_build.partition("=")
        build = torch_build()
        if kind == "cpu":
            extra = {k: v for k, v in build.items() if v}
            if extra:
                errors.append(f"torch is a GPU build ({extra}); the CPU image needs the CPU build")
        elif kind in build:
            have = build[kind]
            if not have or not same_release(have, pinned):
                errors.append(f"torch is built for {kind} {have}, the version table pins {pinned}: {FIX}")
            else:
                notes.append(f"torch built for {kind} {have} matches {pinned}")
        else:
            errors.append(f"--torch-build {args.torch_build!r}: expected cpu, cuda=VER or hip=VER")
    return errors, notes, constraints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", help="Python release the image must run, e.g. 3.11")
    parser.add_argument("--require", type=parse_pin, action="append", default=[], metavar="DIST==VER")
    parser.add_argument("--optional", type=parse_pin, action="append", default=[], metavar="DIST==VER")
    parser.add_argument("--torch-build", help="cpu, cuda=VER or hip=VER: what torch must be built for")
    parser.add_argument("--constraints", help="write dist==installed lines for the packages found here")
    args = parser.parse_args(argv)
    errors, notes, constraints = check(args)
    for line in notes:
        print(f"verify_base: {line}")
    if args.constraints:
        with open(args.constraints, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in constraints))
    for line in errors:
        print(f"verify_base: error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
