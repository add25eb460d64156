"""``plan-client``: what a hospital runs.

Add commands with ``@app.command()`` or ``app.command("name")(function)``; keep heavy
imports (torch, flwr) inside the command functions so ``--help`` stays fast.
"""

from __future__ import annotations

import typer

from client.export import export_command

app = typer.Typer(
    help="PLAN site (hospital) tools.\n\n"
    "Example: plan-client export out/site-a --pool pool.example.org:50061 --credentials creds/sites/hospital-a",
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

def main() -> None:
    app()


if __name__ == "__main__":
    main()
