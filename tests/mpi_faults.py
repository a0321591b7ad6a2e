"""Run the OSSE under mpiexec through a communicator that injects faults (a test-side seam).

    mpiexec -n 2 python tests/mpi_faults.py CONFIG OUT [--silent-rank R] [--duplicates N]
        [--outside-grid N] [--fail-rank R] [--fail-update-rank R]

The driver all-gathers three kinds of item: each rank's observation streams (a dict), its window
status (None or an error string) and its ensemble sums (a tuple). :class:`FaultyComm` edits the items
this rank sends, so the real driver meets the faults exactly as it would from a broken rank or stream:
an empty stream, repeated observations, indices beyond the grid, a rank failing to draw its
observations or to advance its window (both in the second cycle).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import numpy as np
from mpi4py import MPI
from wind_bmi.coupling.assimilate import AssimilationError, load_assimilation_config, run_assimilation


class FaultyComm:
    """An mpi4py communicator whose ``allgather`` sends this rank's items altered by the faults."""

    def __init__(self, comm: Any, args: argparse.Namespace) -> None:
        self.comm, self.args = comm, args
        self.rank = comm.Get_rank()
        self.cycle = {"obs": 0, "status": 0}

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return int(self.rank)

    def Get_size(self) -> int:  # noqa: N802
        return int(self.comm.Get_size())

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root)

    def allgather(self, obj: Any) -> list[Any]:
        a = self.args
        if isinstance(obj, dict):  # observation streams: variable -> (indices, values, errors)
            self.cycle["obs"] += 1
            if self.cycle["obs"] == 2 and self.rank == a.fail_rank:
                obj = f"rank {self.rank}: RuntimeError: injected failure on rank {self.rank}"
            elif self.rank == a.silent_rank:
                obj = {k: (i[:0], v[:0], e[:0]) for k, (i, v, e) in obj.items()}
            else:
                idx, val, err = obj["temperature"]
                d, o = a.duplicates, a.outside_grid
                idx = np.concatenate([idx, idx[:d], a.grid_size + np.arange(o)])
                val = np.concatenate([val, val[:d], np.zeros(o)])
                err = np.concatenate([err, err[:d], np.ones(o)])
                obj = {**obj, "temperature": (idx, val, err)}
        elif obj is None or isinstance(obj, str):  # window status
            self.cycle["status"] += 1
            if self.cycle["status"] == 2 and self.rank == a.fail_update_rank:
                obj = (f"rank {self.rank} (cycle 2, window update): RuntimeError: injected update failure on "
                       f"rank {self.rank}")
        return list(self.comm.allgather(obj))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    for flag in ("--silent-rank", "--fail-rank", "--fail-update-rank"):
        p.add_argument(flag, type=int, default=-1)
    p.add_argument("--duplicates", type=int, default=0)
    p.add_argument("--outside-grid", type=int, default=0)
    p.add_argument("--grid-size", type=int, default=8 * 48 * 96)
    args = p.parse_args()
    cfg = load_assimilation_config(args.config)
    cfg = dataclasses.replace(cfg, cycles=min(cfg.cycles, 2), members=min(cfg.members, 2), steps=4)
    try:
        run_assimilation(cfg, args.out, FaultyComm(MPI.COMM_WORLD, args))
    except AssimilationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
