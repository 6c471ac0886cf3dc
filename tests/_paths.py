"""Where the read-only benchmark data lives: ``<repo>/../shared/data`` (never copied into the repo)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
