"""``python -m server.pool serve|check|ls|pull|web``: the pool commands without the rest of the server CLI."""

from server.pool.cli import app

if __name__ == "__main__":
    app(prog_name="python -m server.pool")
