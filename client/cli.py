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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
