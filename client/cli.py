"""``plan-client``: what a hospital runs.

Add commands with ``@app.command()`` or ``app.command("name")(function)``; keep heavy
imports (torch, flwr) inside the command functions so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from client.export import export_command

app = typer.Typer(
    help="PLAN site (hospital) tools.\n\n"
    "Example: plan-client export out/site-a --pool pool.example.org:9444 --credentials keys",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """PLAN site (hospital) tools."""


app.command("export")(export_command)


@app.command("start")
def start(
    config: str = typer.Option(..., "--config", "-c", help="site.yaml (see deploy/site.yaml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the SuperNode command line and exit."),
) -> None:
    """Start this hospital's Flower SuperNode (TLS to the coordinator's proxy, node key, local data path).

    Example: plan-client start --config /etc/plan/site.yaml
    """
    from client.supernode import start_command

    raise typer.Exit(start_command(config, dry_run))

keys_app = typer.Typer(help="This site's (or reader's) own keys: made here, never sent anywhere.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    dir: Path = typer.Option(..., "--dir", help="The identity's folder (made, 0700; must not hold keys yet)."),
    name: str = typer.Option(..., "--name", help="Identity name (the site id the coordinator knows you by)."),
    role: str = typer.Option("site", "--role", help="site (trains, pushes bundles) or reader (lists and pulls the pool)."),
) -> None:
    """Make this identity's private keys here (0600) and the public enrolment file for the coordinator.

    Site: TLS key + certificate request, Ed25519 bundle-signing key, Flower SuperNode key.
    Reader: TLS key + certificate request. Send DIR/enrolment.json to the coordinator
    (`plan-server certs enroll`) and read the printed fingerprints out to them on a second channel.
    Example: plan-client keys init --dir /etc/plan/site --name hospital-a
    """
    from plan_shared.enrolment import EnrolmentError, init_keys, read_enrolment

    try:
        path = init_keys(dir, name, role)
        fps = read_enrolment(path).fingerprints
    except (EnrolmentError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"keys of {role} {name!r} made in {dir}; send {path} to the coordinator")
    for k, v in fps.items():
        if v:
            typer.echo(f"  {k:8s} key sha256 {v}")


@keys_app.command("install")
def keys_install(
    response: Path = typer.Argument(..., help="The response file from `plan-server certs enroll`."),
    dir: Path = typer.Option(..., "--dir", help="The folder of `keys init`."),
    ca_sha256: str | None = typer.Option(None, "--ca-sha256", help="Refuse unless the CA certificate has this sha256 "
                                            "(the coordinator prints it at `certs enroll`)."),
) -> None:
    """Install the signed certificate and the federation CA certificate next to the keys.

    Example: plan-client keys install hospital-a.response.json --dir /etc/plan/site
    """
    from plan_shared.credentials import CredentialsError
    from plan_shared.enrolment import EnrolmentError, ca_fingerprint, install_certificate

    try:
        creds = install_certificate(dir, response, expect_ca_sha256=ca_sha256)
    except (EnrolmentError, CredentialsError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"installed the certificate of {creds.role} {creds.name!r} in {dir}; "
               f"CA certificate sha256 {ca_fingerprint(creds.ca_pem)} (compare with the coordinator's)")


def _site_config(config: Path | None, dataset: str | None, data: Path | None, sets: list[str] | None, **extra):
    """Resolve a site configuration from a YAML file, --dataset/--data and --set KEY=VALUE."""
    from plan_shared.config import ConfigError, data_overrides, load_config, parse_sets

    try:
        overrides = data_overrides(dataset, data)
        overrides.update(parse_sets(sets))
        overrides.update({k: v for k, v in extra.items() if v is not None})
        return load_config(config, overrides, role="site")
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


_SET_HELP = "Override any configuration key, e.g. --set gan.steps=500 --set data.size=64 (repeatable)."


@app.command("train-gan")
def train_gan_cmd(
    dataset: str | None = typer.Option(None, "--dataset", help="MedMNIST name (from $PLAN_DATA_DIR), e.g. pneumoniamnist."),
    data: Path | None = typer.Option(None, "--data", help="A MedMNIST-format .npz, an ImageFolder root or a CSV manifest."),
    config: Path | None = typer.Option(None, "--config", "-c", help="site.yaml; defaults otherwise."),
    out: Path = typer.Option(Path("runs/gan"), "--out", "-o", help="Output folder (checkpoint, sample grids, report)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Total generator steps (gan.steps)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N."),
    seed: int | None = typer.Option(None, "--seed", help="One seed for Python, NumPy and torch."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT/checkpoint.pt exactly where it stopped."),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved configuration and exit."),
) -> None:
    """Train the style-based generator on this site's images alone.

    Example: plan-client train-gan --dataset pneumoniamnist --out runs/gan
    """
    from plan_shared.runtime import setup_logging

    cfg = _site_config(config, dataset, data, sets, **{"gan.steps": steps, "device": device, "seed": seed})
    if dry_run:
        typer.echo(cfg.to_yaml())
        return
    setup_logging()
    from client.train_gan import train_gan

    report = train_gan(cfg, out, resume=resume)
    typer.echo(
        f"{report['steps']} steps in {report['timing']['train_s']:.0f}s; "
        f"checkpoint {report['checkpoint']}; samples {report['sample_grid']}"
    )


config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML file to resolve; defaults otherwise."),
    dataset: str | None = typer.Option(None, "--dataset", help="As for train-gan."),
    data: Path | None = typer.Option(None, "--data", help="As for train-gan."),
    sets: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    doc: bool = typer.Option(False, "--doc", help="Print every key with its default and description instead."),
) -> None:
    """Print the resolved configuration (YAML), or with --doc the documented defaults.

    Example: plan-client config show --config site.yaml --set gan.steps=100
    """
    if doc:
        from plan_shared.config import describe_defaults

        typer.echo(describe_defaults())
        return
    typer.echo(_site_config(config, dataset, data, sets).to_yaml())


@app.command("synthesize")
def synthesize_cmd(
    dataset: str = typer.Option(None, "--dataset", help="MedMNIST name looked up in $PLAN_DATA_DIR, e.g. pneumoniamnist."),
    data: str = typer.Option(None, "--data", help="A MedMNIST-format .npz, an ImageFolder root or a CSV manifest."),
    config: str = typer.Option(None, "--config", "-c", help="site.yaml; documented defaults otherwise."),
    generator: str = typer.Option(None, "--generator", "-g", help="Generator checkpoint; without it one is trained locally first."),
    method: str = typer.Option(None, "--method", "-m", help="auto | plan | linear | random: whose accepted images are exported (auto: the method the site's verdict supports; default synthesis.method)."),
    out: str = typer.Option("runs/synthesize", "--out", "-o", help="Output dir (images/<class>/<id>.png, manifest.json, report.json, PNGs)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N (default: config, auto)."),
    sets: list[str] = typer.Option(None, "--set", help="Override a configuration key, e.g. --set navigation.steps=100 (repeatable)."),
) -> None:
    """Run the PLAN site pipeline (phi_id, phi_class, inversion, k-same anchors, PLAN paths, privacy filter).

    Example: plan-client synthesize --dataset pneumoniamnist --generator runs/gan/checkpoint.pt --out runs/site-a
    """
    from pathlib import Path as _P

    from client.synthesize import resolve_config, summary_line, synthesize
    from plan_shared.config import SYNTHESIS_METHODS, ConfigError
    from plan_shared.runtime import setup_logging

    try:
        cfg = resolve_config(_P(config) if config else None, dataset, _P(data) if data else None, sets, device=device)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if method is not None and method not in SYNTHESIS_METHODS:  # autoexport: auto too
        typer.echo(f"error: --method must be auto, plan, linear or random, got {method!r}", err=True)
        raise typer.Exit(2)
    setup_logging()
    report = synthesize(cfg, _P(out), _P(generator) if generator else None, method)
    typer.echo(summary_line(report))
    typer.echo(f"output: {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
