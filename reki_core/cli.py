"""The `reki` command line: the steps the Makefile and the DAGs use. `reki --help` lists them."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
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
    """Obtain MovieLens-100K and SmolLM2-135M-Instruct, generate local credentials, fetch Spark's pinned connector
    jars into the jar cache, build the smoke model, llama.cpp's server (once per machine) and the JVM class archive
    of spark-submitted jobs (idempotent)."""
    from reki_core.datasets import movielens
    from reki_core.jars import LOCK_FILE, cache_dir, ensure_jars
    from reki_core.llm.instruct_model import ensure_instruct_model
    from reki_core.llm.llama_cpp_server import ensure_llama_server
    from reki_core.llm.smoke_model import ensure_smoke_model
    from reki_core.localstack import ensure_connect_token, ensure_credentials
    from reki_core.spark import ensure_class_archive

    cfg = _config(ctx)
    t = time.perf_counter()
    folder = movielens.obtain(cfg.data_dir)
    console.print(f"[green]MovieLens-100K[/] ready in {folder} ({time.perf_counter() - t:.1f}s)")
    ensure_credentials(cfg.state_dir)
    ensure_connect_token(cfg.state_dir)
    t = time.perf_counter()
    jars = ensure_jars(report=lambda line: console.print(f"  {line}"))
    console.print(f"[green]Spark connector jars[/] ({len(jars)}, sha256-verified against {LOCK_FILE.name}) in "
                  f"{cache_dir()} ({time.perf_counter() - t:.1f}s)")
    console.print(f"[green]credentials[/] (S3 identities, Spark Connect token) in {cfg.state_dir / 'secrets'} (mode 0600)")
    # Its own folder, whichever model llm.engine.model_path names: tests and plumbing runs configure it.
    path = ensure_smoke_model(cfg.resolve(cfg.paths.models_dir) / "smoke-lm")
    console.print(f"[green]smoke model[/] in {path} (meaningless text: proves the plumbing only)")
    t = time.perf_counter()
    path = ensure_instruct_model(cfg.resolve(cfg.paths.models_dir), cfg.state_dir / "downloads",
                                 report=lambda line: console.print(f"  {line}"))
    console.print(f"[green]SmolLM2-135M-Instruct[/] (Apache-2.0) in {path} ({time.perf_counter() - t:.1f}s)")
    if cfg.llm.server.program == "llama.cpp":
        t = time.perf_counter()
        binary = ensure_llama_server(cfg.state_dir / "downloads", report=lambda line: console.print(f"  {line}"))
        console.print(f"[green]llama-server[/] (llama.cpp, MIT) {binary} ({time.perf_counter() - t:.1f}s)")
    if cfg.spark.class_archive:
        t = time.perf_counter()
        try:
            archive, built = ensure_class_archive(cfg)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # a speed-up only: Spark runs without it
            console.print(f"[yellow]JVM class archive not built; spark-submit runs without it[/]: {exc}")
        else:
            console.print(f"[green]JVM class archive[/] for spark-submit in {archive} "
                          f"({f'built in {time.perf_counter() - t:.0f}s' if built else 'up to date'})")


@main.group()
def stack() -> None:
    """The local stack on loopback: SeaweedFS (credentials enforced), the Spark Connect server (token enforced) and
    the warm LLM server (llm.server)."""


def _services(cfg: Config) -> list:
    from reki_core.localstack import LLMServer, SeaweedFS, SparkConnectServer

    services = [SeaweedFS(cfg.state_dir, cfg.object_store.endpoint_url, cfg.object_store.bucket, cfg.lake.bucket),
                SparkConnectServer(cfg)]
    return services + ([LLMServer(cfg)] if cfg.llm.server.enabled else [])


def _endpoint(cfg: Config, service) -> str:
    if service.name == "llm-server":
        return f"{service.url} ({cfg.llm.engine.model_id})"
    return cfg.object_store.endpoint_url if service.name == "seaweedfs" else f"{cfg.spark.connect_url} (master {service.master})"


@stack.command("up")
@click.pass_context
def stack_up(ctx: click.Context) -> None:
    """Start SeaweedFS, the Spark Connect server and the LLM server (each a no-op when already running)."""
    cfg = _config(ctx)
    for service in _services(cfg):
        was_running = service.running()
        t = time.perf_counter()
        service.start()
        state = "already running" if was_running else f"started in {time.perf_counter() - t:.0f}s"
        console.print(f"{service.name} {state}: {_endpoint(cfg, service)}; log {service.log_file}")


@stack.command("down")
@click.pass_context
def stack_down(ctx: click.Context) -> None:
    """Stop what `stack up` started, by its PID files."""
    for service in reversed(_services(_config(ctx))):
        console.print(f"{service.name} {'stopped' if service.stop() else 'was not running'}")


@stack.command("status")
@click.pass_context
def stack_status(ctx: click.Context) -> None:
    cfg = _config(ctx)
    up = True
    for service in _services(cfg):
        running = service.running()
        up &= running
        console.print(f"{service.name}: {'running, pid ' + str(service.pid()) if running else 'stopped'} ({_endpoint(cfg, service)})")
    sys.exit(0 if up else 1)


@main.command("env")
@click.option("--role", type=click.Choice(["writer", "reader"]), default="writer")
@click.pass_context
def env_exports(ctx: click.Context, role: str) -> None:
    """Print shell exports for the local credentials (AWS_* and Airflow's aws_default connection; for the
    writer, also the Spark Connect token, Airflow's Spark Connect connection and where the Airflow UI's password
    file is). The reader's lines unset the writer's: a consumer's shell holds the read-only identity alone."""
    from reki_core.localstack import (CONNECT_TOKEN_ENV, credential_environment, ensure_airflow_passwords,
                                      ensure_connect_token)
    from reki_core.spark import connect_endpoint

    cfg = _config(ctx)
    exports = credential_environment(cfg, role)
    writer_only = [CONNECT_TOKEN_ENV, f"AIRFLOW_CONN_{cfg.spark.connect_conn_id.upper()}",
                   "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    if role == "writer":  # consumers only read vectors: no Spark for them
        token = ensure_connect_token(cfg.state_dir)
        host, port = connect_endpoint(cfg.spark.connect_url)
        spark_conn = {"conn_type": "spark_connect", "host": host, "port": port, "password": token}
        exports.update(zip(writer_only, [token, json.dumps(spark_conn), str(ensure_airflow_passwords(cfg.state_dir))]))
    for key, value in exports.items():
        click.echo(f"export {key}={shlex.quote(value)}")
    for key in writer_only if role == "reader" else []:
        click.echo(f"unset {key}")


@main.group()
def lake() -> None:
    """The lake's Iceberg tables on a deployed Spark Connect server (infra/deploy/): its Spark settings, its bucket."""


@lake.command("spark-conf")
@click.option("--append", "path", required=True, type=click.Path(dir_okay=False),
              help="The Spark properties file (--properties-file) to append to; created owner-only.")
@click.pass_context
def lake_spark_conf(ctx: click.Context, path: str) -> None:
    """Append the lake's catalog settings (jars, Iceberg catalog, s3a) and the catalog's login (REKI_CATALOG_DB_USER /
    REKI_CATALOG_DB_PASSWORD) to a Spark properties file: the settings stay off the Connect server's command line."""
    from pathlib import Path

    from reki_core.jars import JarError
    from reki_core.storage.tables import append_spark_properties

    try:
        keys = append_spark_properties(_config(ctx), Path(path))
    except (JarError, PermissionError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(keys)} lake settings appended to {path}")  # the keys only: the file holds a password


@lake.command("bucket")
@click.pass_context
def lake_bucket(ctx: click.Context) -> None:
    """Create the lake bucket (lake.bucket) when it does not exist, as the identity in AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (the writer's)."""
    from reki_core.storage.s3_access import ObjectStoreError
    from reki_core.storage.tables import ensure_lake_bucket, lake_access

    cfg = _config(ctx)
    try:
        ensure_lake_bucket(cfg, lake_access(cfg))
    except ObjectStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"lake bucket s3://{cfg.lake.bucket} at {cfg.object_store.endpoint_url}: present")


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


# What the summary shows of each step's record (all of it stays in _runs/dt=D/<step>.json).
SUMMARY_FACTS = (
    "initial_load", "days_landed", "rows_today", "rows", "rejected", "no_new_data", "users", "items",
    "dirty_users", "dirty_items", "samples", "label_rate", "groups", "groups_kept", "mode", "to_ask", "with_knowledge",
    "n_prompts", "n_pending", "cache_hits", "calls", "prompt_tokens", "completion_tokens", "tokens_per_s",
    "encoded", "cache_hit_rate", "test_auc_with_knowledge", "test_auc_no_knowledge", "published",
    "version", "latest_moved", "skipped", "reason",
)


@main.command()
@click.option("--dt", "day", default=None)
@click.pass_context
def summary(ctx: click.Context, day: str | None) -> None:
    """Print what the run of a date did: each step's counts, gates and time."""
    from reki_core.runlog import read_steps
    from reki_core.storage.lake import lake_of

    cfg = _config(ctx)
    day_ = _date(day, cfg)
    lake = lake_of(cfg)
    steps = read_steps(lake, day_)
    if not steps:
        raise click.ClickException(f"no run records for {day_} under {lake.uri}/_runs/")
    wide = Console(width=max(console.width, 140))
    table = Table(title=f"REKI daily refresh dt={day_} ({cfg.scenario.name}), lake {lake.uri}")
    for col, justify in (("step", "left"), ("ok", "left"), ("seconds", "right"), ("what it did", "left")):
        table.add_column(col, justify=justify)
    shards = [s for s in steps if s["step"].startswith("llm_shard_")]
    for s in steps:
        if s in shards:
            continue
        facts = ", ".join(f"{k}={round(s[k], 4) if isinstance(s[k], float) else s[k]}" for k in SUMMARY_FACTS
                          if k in s and not isinstance(s[k], (dict, list)))
        for g in s.get("gates", []) if isinstance(s.get("gates"), list) else []:
            if isinstance(g, dict) and "dataset" in g:
                facts += f"\n gate {g['dataset']}: {'passed' if g.get('success') else 'FAILED'} ({g.get('evaluated')} checks)"
                facts += "".join(f"\n   warning: {w}" for w in g.get("warnings", []))
        for w in s.get("gate_warnings", []) if isinstance(s.get("gate_warnings"), list) else []:
            facts += f"\n warning: {w}"
        if s.get("error"):
            facts += f"\n [red]{s['error']}[/]"
        table.add_row(s["step"], "[green]yes[/]" if s.get("success", True) else "[red]NO[/]",
                      f"{s.get('seconds', 0):.1f}", facts)
    if shards:
        table.add_row(f"llm shards ({len(shards)})", "[green]yes[/]" if all(x.get("success", True) for x in shards) else "[red]NO[/]",
                      f"{sum(x.get('wall_seconds', x.get('seconds', 0)) for x in shards):.1f}",
                      f"calls={sum(x.get('calls', 0) for x in shards)}, cache_hits={sum(x.get('cache_hits', 0) for x in shards)}")
    wide.print(table)
    if cfg.llm.is_smoke_model:
        wide.print("[yellow]LLM: the embedded smoke model writes meaningless text; it proves the plumbing only. "
                   "Configure a real instruct model (README: 'Real LLMs') for real knowledge.[/]")
    by_step = {s["step"]: s for s in steps}
    if "train_model" in by_step:
        t = by_step["train_model"]
        wide.print(f"Model {t.get('version')}: test AUC with knowledge {t.get('test_auc_with_knowledge', float('nan')):.4f} "
                   f"vs without {t.get('test_auc_no_knowledge', float('nan')):.4f}; evaluation gate "
                   f"{'passed' if t.get('published') else 'FAILED'}")
    if "publish" in by_step:
        wide.print(f"Published: [bold]{by_step['publish'].get('uri')}[/] (latest moved: {by_step['publish'].get('latest_moved')})")
    docs = f"{lake.root}/_runs/dt={day_.isoformat()}/data_docs/index.html"
    if lake.fs.exists(docs):
        wide.print(f"Data Docs (every gate's expectations and results): {lake.uri_of(docs)}")


if __name__ == "__main__":
    main()
