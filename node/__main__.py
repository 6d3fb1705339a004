"""``python -m headwater.node [flags]``: run one node (the ``headwater node`` command does the same)."""

from __future__ import annotations

import argparse
import sys

from headwater.config import ConfigError, add_config_flags, config_from_args
from headwater.node.server import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headwater node", description="Run a Headwater node.")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ConfigError, OSError) as e:
        print(f"headwater node: {e}", file=sys.stderr)
        return 2
    code: int = serve(config)
    return code


if __name__ == "__main__":
    sys.exit(main())
