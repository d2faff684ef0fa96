"""Keep docker/Dockerfile.<platform> in step with the version table and the platform's env facts.

Each Dockerfile declares its pinned versions as ``ARG NAME=value`` lines (names from
``versions.docker_args``) and the platform's worker env as ``ENV NAME=value`` lines (from the platform
class's comm_env_defaults and runtime_env_defaults, plus PORTABLE_RL_PLATFORM). ``sync`` rewrites those
values in place and leaves every other line alone; a name the Dockerfile lacks is an error, because where
the line goes (which stage, which comment) is the author's call.
"""

from __future__ import annotations

import re

from portable_rl.backends import versions
from portable_rl.platform import PLATFORM_ENV, platform_class

LINE = re.compile(r"^(?P<kind>ARG|ENV)[ \t]+(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>\S*)[ \t]*$")


class DockerfileError(ValueError):
    """A Dockerfile lacks a line the table needs; the message names the file, the line and the fix."""


def dockerfile_path(platform: str) -> str:
    return f"docker/Dockerfile.{platform}"


def expected_env(platform: str) -> dict[str, str]:
    cls = platform_class(platform)
    return {PLATFORM_ENV: platform, **cls.comm_env_defaults, **cls.runtime_env_defaults}


def expected(platform: str) -> dict[tuple[str, str], str]:
    """(ARG|ENV, name) -> value the Dockerfile of ``platform`` must carry."""
    want = {("ARG", name): value for name, value in versions.docker_args(platform).items()}
    want.update({("ENV", name): value for name, value in expected_env(platform).items()})
    return want


def sync(platform: str, text: str) -> str:
    """``text`` with every expected ARG default and ENV value set from the table; raises if one is missing."""
    want = expected(platform)
    seen: set[tuple[str, str]] = set()
    out = []
    for line in text.splitlines(keepends=True):
        match = LINE.match(line.rstrip("\n"))
        key = (match["kind"], match["name"]) if match else None
        if key in want:
            if key in seen:
                raise DockerfileError(
                    f"{dockerfile_path(platform)}: {key[0]} {key[1]} is set twice; keep one line"
                )
            seen.add(key)
            newline = "\n" if line.endswith("\n") else ""
            line = f"{key[0]} {key[1]}={want[key]}{newline}"
        out.append(line)
    missing = [f"{kind} {name}={value}" for (kind, name), value in want.items() if (kind, name) not in seen]
    if missing:
        raise DockerfileError(
            f"{dockerfile_path(platform)} lacks {', '.join(missing)}: add the line(s) where they belong"
        )
    return "".join(out)
