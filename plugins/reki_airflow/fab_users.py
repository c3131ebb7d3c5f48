"""The cluster profile's UI and REST API users (FAB auth manager): each user of `reki_core.cluster.UI_USERS` with its
role (Admin; Op: trigger runs and backfills; Viewer: read only) and its generated password, read from a 0600 file
(`airflow users create` would take it on its command line, which `ps` shows). Idempotent: `make cluster` runs it on
every start and puts back a role or password changed since.

    python -m reki_airflow.fab_users <passwords.json>     (run by `python -m reki_core.cluster up`, Airflow's env set)
    python -m reki_airflow.fab_users --from-env           (deployments: AIRFLOW_UI_<USER>_PASSWORD, the init job's alone)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def ensure_users(passwords: dict[str, str], roles: dict[str, str]) -> list[str]:
    """Create or update each user of `roles` (user -> FAB role) with its password; returns what was done, per user."""
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    done = []
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        for username, role_name in roles.items():
            role = sm.find_role(role_name)
            if role is None:
                raise SystemExit(f"FAB has no role {role_name!r} (roles: {[r.name for r in sm.get_all_roles()]})")
            user = sm.find_user(username=username)
            if user is None:
                created = sm.add_user(username=username, first_name=username, last_name="reki",
                                      email=f"{username}@reki.invalid", role=role, password=passwords[username])
                if not created:
                    raise SystemExit(f"FAB did not create the user {username!r}")
                done.append(f"{username}: created ({role_name})")
                continue
            user.roles = [role]
            sm.update_user(user)
            sm.reset_password(user.id, passwords[username])
            done.append(f"{username}: up to date ({role_name})")
    return done


def main() -> None:
    from reki_core.cluster import UI_USERS

    if sys.argv[1:] == ["--from-env"]:
        names = {user: f"AIRFLOW_UI_{user.upper()}_PASSWORD" for user in UI_USERS}
        missing = [name for name in names.values() if not os.environ.get(name)]
        if missing:
            raise SystemExit(f"set {', '.join(missing)}: the UI users' passwords")
        passwords = {user: os.environ[name] for user, name in names.items()}
    else:
        passwords = json.loads(Path(sys.argv[1]).read_text())
    for line in ensure_users(passwords, UI_USERS):
        print(line)


if __name__ == "__main__":
    main()
