"""``wind-bmi``: the command line.

User commands: ``run`` (drive WindBmi headless), ``evaluate`` (the tasks against baselines),
``assimilate`` (cycled data assimilation under mpiexec), ``data inspect`` and ``data subset``.
Maintainer commands: ``data generate`` (SPEEDY via jcm), ``train``, ``band-limit``, ``report-prior``
and ``bench``. Bad input ends in one line naming the argument, file or key (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wind_bmi.cli import maintainer, user


def build_parser() -> argparse.ArgumentParser:
    from wind_bmi import __version__

    p = argparse.ArgumentParser(prog="wind-bmi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"wind-bmi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="inspect or cut datasets (user); generate SPEEDY data (maintainer)")
    dsub = data.add_subparsers(dest="data_command", required=True)
    user.add_commands(sub, dsub)
    maintainer.add_commands(sub, dsub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (a config key, a file, an argument) ends in one line on stderr naming
    it, exit status 2; anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:  # ConfigError, CheckpointError, LayoutError, ComponentError are ValueErrors
        message = " ".join(str(exc).split())
        print(f"wind-bmi {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
