"""``plan-server``: what the coordinator runs.

Command groups live next to their code and are registered here; add a top-level
command with ``@app.command()`` below, or a group with ``app.add_typer(...)``.
Heavy imports (torch, flwr) belong inside command functions so that ``--help`` and
the light groups (``certs``, ``pool``) start fast.
"""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
