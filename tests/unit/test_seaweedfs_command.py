"""The local SeaweedFS's command line: settings whose defaults broke CI."""

from reki_core.localstack import SeaweedFS


def test_volume_slots_do_not_depend_on_free_disk(tmp_path):
    # Left at 0, `weed mini` allows free disk / 64 MB volumes: on a CI disk with little room the per-test
    # buckets used them up and PutObject failed with InternalError (CI of stop 32).
    command = SeaweedFS(tmp_path, "http://127.0.0.1:8333", "reki-vectors").command()
    caps = [arg.split("=", 1)[1] for arg in command if arg.startswith("-volume.max=")]
    assert len(caps) == 1 and int(caps[0]) >= 100
