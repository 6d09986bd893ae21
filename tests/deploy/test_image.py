"""What the container image is made of: the installed package (not a checkout) must carry every
file the services read at run time, and the image must run as a numeric non-root user.
`deploy/image-check.sh` builds and runs the real image (not part of `make test`: it needs buildah
and minutes); these are the parts of it that can be checked quickly."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from services.actions.config import DEFAULT_POLICIES_FILE

REPO = Path(__file__).resolve().parents[2]


def test_the_built_package_carries_the_default_policy_document(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("churnguard-*.whl")
    inside = DEFAULT_POLICIES_FILE.relative_to(REPO).as_posix()
    with zipfile.ZipFile(wheel) as archive:
        assert inside in archive.namelist(), f"{inside} is not in {wheel.name}"
        assert archive.read(inside) == DEFAULT_POLICIES_FILE.read_bytes()


def test_the_image_runs_as_a_numeric_non_root_user_with_the_cli_as_entrypoint() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", final_stage, re.M)
    assert 'ENTRYPOINT ["churnguard"]' in final_stage
    # Only what the image needs is sent to the build (the package and its metadata).
    assert (REPO / ".dockerignore").read_text().splitlines()[:2] == ["# Only pyproject.toml, README.md, shared/ and services/ go into the image.", "*"]
