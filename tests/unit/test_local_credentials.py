"""Local S3 credentials: generated once, owner-only, and never rewritten under a reader when unchanged."""

from __future__ import annotations

import stat

from reki_core.localstack import ensure_credentials, secrets_dir


def test_credentials_are_generated_once_private_and_left_alone_when_unchanged(tmp_path):
    first = ensure_credentials(tmp_path)
    folder = secrets_dir(tmp_path)
    identities = folder / "s3_identities.json"
    before = identities.stat()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}
    assert ensure_credentials(tmp_path) == first  # same identities every time
    after = identities.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert sorted(p.name for p in folder.iterdir()) == ["s3_credentials.json", "s3_identities.json"]  # no temp left
