"""``plan-server``: what the coordinator runs.

Command groups live next to their code and are registered here; add a top-level
command with ``@app.command()`` below, or a group with ``app.add_typer(...)``.
Heavy imports (torch, flwr) belong inside command functions so that ``--help`` and
the light groups (``certs``, ``pool``) start fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from server.certs import app as certs_app
from server.pool.cli import app as pool_app

app = typer.Typer(
    help="PLAN coordinator: federation credentials, the shared pool of synthetic images, federated runs.\n\n"
    "Example: plan-server certs init --dir certs && plan-server pool serve --store pool --certs certs",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(certs_app, name="certs")
app.add_typer(pool_app, name="pool")


@app.command("simulate")
def simulate(
    config: Path = typer.Option(None, "--config", "-c", help="PlanConfig YAML (models, GAN, federation.*); defaults otherwise."),
    sites: int = typer.Option(3, "--sites", "-n", min=1, help="Number of virtual hospitals."),
    rounds: int = typer.Option(None, "--rounds", "-r", min=1, help="Federated rounds (default federation.rounds)."),
    dataset: str = typer.Option(None, "--dataset", help="MedMNIST name, e.g. pneumoniamnist (looked up in $PLAN_DATA_DIR)."),
    data: Path = typer.Option(None, "--data", help="A .npz (MedMNIST format), an ImageFolder root or a CSV manifest."),
    partition: str = typer.Option(None, "--partition", help="iid or dirichlet (default partition.scheme)."),
    alpha: float = typer.Option(None, "--alpha", help="Dirichlet concentration (small = strong label skew)."),
    local_steps: int = typer.Option(None, "--local-steps", min=1, help="GAN steps per site and round."),
    share: str = typer.Option(None, "--share", help="gd (G and D averaged, FedGAN) or g (G only; D stays per site)."),
    out: Path = typer.Option(Path("sim-out"), "--out", "-o", help="Checkpoints, samples, metrics.jsonl, per-site state."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also Flower's DEBUG log, Ray's actor output and warnings."),
    preset: str | None = typer.Option(None, "--preset", help="A preset of server/presets instead of --config: demo or quality (64 px, longer rounds)."),
) -> None:
    """Federated generator training with N simulated hospitals (Flower simulation engine).

    Example: plan-server simulate --sites 3 --rounds 5 --dataset pneumoniamnist --partition dirichlet --alpha 0.5 --out sim
    """
    from server.demo import preset_path
    from server.simulate import simulate_command

    if preset is not None:
        if config is not None:
            typer.echo("error: give --config or --preset, not both", err=True)
            raise typer.Exit(2)
        try:
            config = preset_path(preset)
        except ValueError as err:
            typer.echo(f"error: --preset: {err}", err=True)
            raise typer.Exit(2) from None
    summary = simulate_command(str(config) if config else None, sites, rounds, dataset, str(data) if data else None,
                               partition, alpha, str(out), local_steps, share, verbose)
    typer.echo(f"{summary['rounds_done']} rounds with {sites} sites in {summary['wall_s']:.1f}s; output in {out}")


@app.command("coordinate")
def coordinate(
    config: Path = typer.Option(..., "--config", "-c", help="coordinator.yaml (see deploy/coordinator.yaml)."),
    app_dir: Path = typer.Option(None, "--app", help="Folder of the Flower app (pyproject.toml); default: this installation."),
) -> None:
    """Start the SuperLink (TLS, node auth, loopback only), register site keys, run and follow the federation.

    Example: plan-server coordinate --config deploy/coordinator.yaml
    Restart it after a crash to resume from the last completed round.
    """
    from server.coordinate import coordinate_command

    raise typer.Exit(coordinate_command(str(config), str(app_dir) if app_dir else None))

@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output folder: report.json/.md, PNGs, pool/, checkpoints."),
    sites: int = typer.Option(3, "--sites", "-n", min=1, help="Simulated hospitals (Dirichlet label skew)."),
    dataset: str = typer.Option("pneumoniamnist", "--dataset", help="MedMNIST name, read from $PLAN_DATA_DIR (downloaded through medmnist when online)."),
    data: Path | None = typer.Option(None, "--data", help="Any MedMNIST-format .npz (grey or RGB, any number of classes); overrides --dataset."),
    method: str | None = typer.Option(None, "--method", help="auto, plan, linear or random: which images the sites export (auto: each site's verdict decides)."),
    k: int | None = typer.Option(None, "--k", min=1, help="Latents averaged per anchor (k-same)."),
    rounds: int | None = typer.Option(None, "--rounds", "-r", min=1, help="Federated GAN rounds."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML replacing the demo preset (server/presets/demo.yaml)."),
    preset: str = typer.Option("demo", "--preset", help="demo (~15 min on 2 CPU cores) or quality (64 px, wider nets, longer rounds; for time or a GPU)."),
    sets: list[str] | None = typer.Option(None, "--set", help="Override any configuration key, e.g. --set federation.local_steps=20."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also Flower's DEBUG log, Ray's actor output and warnings."),
) -> None:
    """The whole federation on one machine: GAN rounds, PLAN at each site, pool, downstream, evaluation, report.

    Example: plan-server demo --sites 3 --dataset pneumoniamnist --method plan --k 5 --out runs/demo
    """
    from plan_shared.config import SYNTHESIS_METHODS, ConfigError, parse_sets
    from server.demo import preset_path, run_demo
    from server.simulate import console_logging

    if config is None:
        try:
            config = preset_path(preset)
        except ValueError as err:
            typer.echo(f"error: --preset: {err}", err=True)
            raise typer.Exit(2) from None
    if method is not None and method not in SYNTHESIS_METHODS:  # autoexport: auto too
        typer.echo(f"error: --method must be auto, plan, linear or random, got {method!r}", err=True)
        raise typer.Exit(2)
    console_logging(verbose)
    try:
        report = run_demo(out, sites=sites, dataset=dataset, data=str(data) if data else None, method=method, k=k,
                          rounds=rounds, config=str(config) if config else None, overrides=parse_sets(sets),
                          verbose=verbose)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as err:  # the run failed; the reason (and where its log is) is in the message
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    u, p = report["utility"], report["privacy"]

    def f3(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

    typer.echo(f"demo finished in {report['timing'].get('demo_total_s', 0):.0f}s: {report['pool']['n_images']} pooled images; "
               f"accuracy {f3(u.get('accuracy'))} (site alone {f3(u.get('real_accuracy'))}); distance-MIA AUC "
               f"{f3(p.get('mia_auc'))} [{f3(p.get('mia_auc_lo'))}, {f3(p.get('mia_auc_hi'))}]")
    typer.echo(f"report: {Path(out) / 'report.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
