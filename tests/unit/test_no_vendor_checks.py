"""The vendor-neutrality rule: only backends/ and the platform interface may name a vendor.

Scans every Python file of the package (except portable_rl/platform.py), benchmarks/ and examples/.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {ROOT / "portable_rl" / "platform.py"}
SCANNED_DIRS = ("portable_rl", "benchmarks", "examples")

VENDOR_PATTERNS = [
    r"torch\.version\.(hip|cuda)",
    r"torch\.cuda\b",
    r"[\"']nccl[\"']",
    r"\b(HIP|ROCR|CUDA)_VISIBLE_DEVICES\b",
    r"\bRCCL_\w+|\bNCCL_\w+",
    r"\bamdsmi\b|\bpynvml\b",
    r"\.cuda\(\)",
    r"device\s*=\s*[\"']cuda",
    r"\bis_hip\b|\bROCm\b|\bnvidia\b",
]
PATTERN = re.compile("|".join(f"(?:{p})" for p in VENDOR_PATTERNS))


def vendor_hits(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if PATTERN.search(line)]


def test_scanner_catches_each_pattern():
    samples = [
        "if torch.version.hip:",
        "torch.cuda.current_device()",
        'dist.init_process_group("nccl")',
        "os.environ['HIP_VISIBLE_DEVICES'] = '0'",
        "env['NCCL_CUMEM_ENABLE'] = '0'",
        "import amdsmi",
        "x = x.cuda()",
        "torch.zeros(1, device='cuda')",
        "# works on ROCm only",
    ]
    for line in samples:
        assert vendor_hits(line), line
    assert not vendor_hits("platform.dist_backend  # collective backend chosen by the platform")


def test_no_vendor_checks_outside_backends():
    offenders = []
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path in ALLOWED or "backends" in path.relative_to(ROOT).parts:
                continue
            for lineno, line in vendor_hits(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line}")
    assert not offenders, "vendor checks outside backends/ (ask the platform instead):\n" + "\n".join(
        offenders
    )
