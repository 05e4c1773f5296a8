"""MPI bootstrap (alternative to torchrun / srun): rank 0 picks the rendezvous address and port and
broadcasts them over MPI; torch.distributed then starts as usual from the environment."""
from __future__ import annotations

import os
import socket


def bootstrap_from_mpi(port: int | None = None) -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from mpi4py. Needs `pip install .[mpi]`."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("MPI bootstrap needs mpi4py: pip install 'erc-megatron[mpi]' "
                           "(and an MPI library, e.g. apt-get install openmpi-bin libopenmpi-dev)") from exc
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    if comm.Get_rank() == 0:
        addr = socket.gethostbyname(socket.gethostname())
        if port is None:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        info = (addr, port)
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()),
                      LOCAL_RANK=str(local.Get_rank()), MASTER_ADDR=addr, MASTER_PORT=str(port))


def main(argv: list[str] | None = None) -> int:
    """`mpirun -np N python -m erc_megatron.dist.mpi train --config ...`: bootstrap, then the CLI."""
    bootstrap_from_mpi()
    from erc_megatron.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
