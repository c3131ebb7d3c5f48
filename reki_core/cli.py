"""The `reki` command line: the steps the Makefile and the DAGs use. `reki --help` lists them."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from reki_core.config import Config, ConfigError, load_config

console = Console()


def _config(ctx: click.Context) -> Config:
    return ctx.obj["config"]


@click.group()
@click.option("--config", "config_path", envvar="REKI_CONFIG", default=None,
              help="Pipeline config (default conf/reki.yaml; env REKI_CONFIG).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """REKI Pipeline: LLM knowledge for recommenders, refreshed daily."""
    try:
        ctx.obj = {"config": load_config(config_path)}
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _date(value: str | None, cfg: Config) -> dt.date:
    return dt.date.fromisoformat(value) if value else cfg.run_date


def _print_json(payload) -> None:
    console.print_json(json.dumps(payload, default=str))


# ------------------------------------------------------------------ set-up and local stack


@main.command()
@click.pass_context
def setup(ctx: click.Context) -> None:
    """Obtain MovieLens-100K, generate local credentials, build the smoke model (idempotent)."""
    from reki_core.datasets import movielens
    from reki_core.localstack import ensure_credentials

    cfg = _config(ctx)
    t = time.perf_counter()
    folder = movielens.obtain(cfg.data_dir)
    console.print(f"[green]MovieLens-100K[/] ready in {folder} ({time.perf_counter() - t:.1f}s)")
    ensure_credentials(cfg.state_dir)
    console.print(f"[green]credentials[/] in {cfg.state_dir / 'secrets'} (mode 0600)")
    try:
        from reki_core.llm.smoke_model import ensure_smoke_model
    except ImportError:
        console.print("[yellow]smoke model builder not available in this version[/]")
    else:
        path = ensure_smoke_model(cfg.resolve(cfg.llm.engine.model_path))
        console.print(f"[green]smoke model[/] in {path} (meaningless text: proves the plumbing only)")


@main.group()
def stack() -> None:
    """The local object store (SeaweedFS on loopback, credentials enforced)."""


def _seaweed(cfg: Config):
    from reki_core.localstack import SeaweedFS

    return SeaweedFS(cfg.state_dir, cfg.object_store.endpoint_url, cfg.object_store.bucket)


@stack.command("up")
@click.pass_context
def stack_up(ctx: click.Context) -> None:
    """Start SeaweedFS (no-op when already running)."""
    cfg = _config(ctx)
    server = _seaweed(cfg)
    was_running = server.running()
    server.start()
    state = "already running" if was_running else "started"
    console.print(f"SeaweedFS {state}: {cfg.object_store.endpoint_url}, bucket {cfg.object_store.bucket}")


@stack.command("down")
@click.pass_context
def stack_down(ctx: click.Context) -> None:
    """Stop SeaweedFS by its PID file."""
    _seaweed(_config(ctx)).stop()
    console.print("SeaweedFS stopped")


@stack.command("status")
@click.pass_context
def stack_status(ctx: click.Context) -> None:
    server = _seaweed(_config(ctx))
    console.print(f"SeaweedFS: {'running, pid ' + str(server.pid()) if server.running() else 'stopped'}")
    sys.exit(0 if server.running() else 1)


@main.command("env")
@click.option("--role", type=click.Choice(["writer", "reader"]), default="writer")
@click.pass_context
def env_exports(ctx: click.Context, role: str) -> None:
    """Print shell exports for the local credentials (AWS_* and Airflow's aws_default connection)."""
    from reki_core.localstack import ensure_credentials

    cfg = _config(ctx)
    creds = ensure_credentials(cfg.state_dir)[role]
    conn = {
        "conn_type": "aws",
        "login": creds.access_key,
        "password": creds.secret_key,
        "extra": {"endpoint_url": cfg.object_store.endpoint_url, "region_name": cfg.object_store.region},
    }
    exports = {
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_ENDPOINT_URL": cfg.object_store.endpoint_url,
        "AWS_DEFAULT_REGION": cfg.object_store.region,
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn),
    }
    for key, value in exports.items():
        click.echo(f"export {key}={shlex.quote(value)}")


# ------------------------------------------------------------------ pipeline steps


@main.command()
@click.option("--dt", "day", default=None, help="Logical date YYYY-MM-DD (default: run_date in config).")
@click.pass_context
def land(ctx: click.Context, day: str | None) -> None:
    """Land the day's deliveries into raw/ (all history up to it on an empty lake)."""
    from reki_core.landing import land as land_day

    cfg = _config(ctx)
    _print_json(land_day(cfg, _date(day, cfg)))


@main.command("gate")
@click.argument("name", type=click.Choice(["raw"]))
@click.option("--dt", "day", default=None)
@click.pass_context
def gate(ctx: click.Context, name: str, day: str | None) -> None:
    """Run a quality gate on the day's outputs."""
    from reki_core.landing import run_raw_gate

    cfg = _config(ctx)
    _print_json(run_raw_gate(cfg, _date(day, cfg)))


@main.command()
@click.option("--dt", "day", default=None)
@click.pass_context
def summary(ctx: click.Context, day: str | None) -> None:
    """Print what the run of a date did: each step's counts, gates and time."""
    from reki_core.runlog import read_steps
    from reki_core.storage.lake import Lake

    cfg = _config(ctx)
    day_ = _date(day, cfg)
    lake = Lake(cfg.lake_uri)
    steps = read_steps(lake, day_)
    if not steps:
        raise click.ClickException(f"no run records for {day_} under {lake.uri}/_runs/")
    table = Table(title=f"REKI daily refresh {day_} ({cfg.scenario.name}) — lake {lake.uri}")
    table.add_column("step")
    table.add_column("ok")
    table.add_column("seconds", justify="right")
    table.add_column("what it did")
    for s in steps:
        facts = {k: v for k, v in s.items() if isinstance(v, (int, float, bool, str)) and k not in
                 ("step", "dt", "recorded_at", "started_at", "seconds", "success", "lake", "error")}
        text = ", ".join(f"{k}={v}" for k, v in facts.items())
        for g in s.get("gates", []):
            text += f"\n gate {g['dataset']}: {'passed' if g['success'] else 'FAILED'} ({g['evaluated']} checks)"
            text += "".join(f"\n   warn: {w}" for w in g.get("warnings", []))
        if s.get("error"):
            text += f"\n [red]{s['error']}[/]"
        table.add_row(s["step"], "[green]yes[/]" if s.get("success", True) else "[red]NO[/]",
                      f"{s.get('seconds', 0):.1f}", text)
    console.print(table)


if __name__ == "__main__":
    main()
