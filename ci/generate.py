"""Write every file derived from ci/matrix.yaml, backends/versions.py and the platform facts.

    python -m ci.generate                  write them in place
    python -m ci.generate --check          write nothing; exit 1 naming each stale file
    python -m ci.generate --out DIR        write the derived files under DIR (inputs still read from --root)
    python -m ci.generate --leg-env LEG    print `export` lines to run ci/legs/<leg>.sh by hand
    python -m ci.generate --check-tag TAG  exit 1 unless TAG is v<PROJECT_VERSION> (the images workflow)

Derived files: .github/workflows/ci.yml, .github/workflows/images.yml, .github/actionlint.yaml,
docker/docker-bake.hcl, and the ARG/ENV value lines of docker/Dockerfile.{cpu,cuda,rocm}. Exit 2 on bad data.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from ci import bake, dockerfiles, workflows
from ci.matrix import ROOT, MatrixError, load
from portable_rl.backends import versions

WORKFLOW_CI = ".github/workflows/ci.yml"
WORKFLOW_IMAGES = ".github/workflows/images.yml"
ACTIONLINT_CONFIG = ".github/actionlint.yaml"
BAKE_FILE = "docker/docker-bake.hcl"


def render(root: Path = ROOT) -> dict[str, str]:
    """Relative path -> content of every derived file, from the inputs under ``root``."""
    matrix = load(root / "ci" / "matrix.yaml")
    files = {
        WORKFLOW_CI: workflows.dump(workflows.ci_workflow(matrix)),
        WORKFLOW_IMAGES: workflows.dump(workflows.images_workflow(matrix)),
        ACTIONLINT_CONFIG: workflows.HEADER
        + yaml.safe_dump(workflows.actionlint_config(matrix), sort_keys=False),
        BAKE_FILE: bake.render(),
    }
    for platform in versions.PLATFORMS:
        path = dockerfiles.dockerfile_path(platform)
        files[path] = dockerfiles.sync(platform, (root / path).read_text(encoding="utf-8"))
    return files


def stale(files: dict[str, str], root: Path) -> list[str]:
    out = []
    for rel, content in files.items():
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            out.append(rel)
    return out


def check_tag(tag: str) -> str | None:
    """None if ``tag`` names the table's version, else the one-line problem."""
    want = f"v{versions.PROJECT_VERSION}"
    if tag == want:
        return None
    return f"tag {tag!r} does not match the version table's PROJECT_VERSION: expected {want!r} (backends/versions.py)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository to read inputs from (default: this one)"
    )
    parser.add_argument("--out", type=Path, help="write derived files under this directory instead of --root")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a derived file is stale; write nothing"
    )
    parser.add_argument(
        "--leg-env", metavar="LEG", help="print the env a leg script expects, as export lines"
    )
    parser.add_argument("--check-tag", metavar="TAG", help="exit 1 unless TAG is v<PROJECT_VERSION>")
    args = parser.parse_args(argv)
    prog = "ci.generate"
    try:
        if args.check_tag is not None:
            problem = check_tag(args.check_tag)
            if problem:
                print(f"{prog}: error: {problem}", file=sys.stderr)
                return 1
            print(f"{prog}: tag {args.check_tag} matches the version table")
            return 0
        if args.leg_env:
            leg = load(args.root / "ci" / "matrix.yaml").leg(args.leg_env)
            for key, value in leg.env().items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        files = render(args.root)
    except (MatrixError, dockerfiles.DockerfileError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        outdated = stale(files, args.root)
        for rel in outdated:
            print(
                f"{prog}: stale: {rel} (run `python -m ci.generate` and commit the result)", file=sys.stderr
            )
        return 1 if outdated else 0
    target = args.out or args.root
    for rel, content in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            print(f"{prog}: wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
