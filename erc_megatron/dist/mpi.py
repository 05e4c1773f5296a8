"""MPI bootstrap (alternative to torchrun / srun): rank 0 picks the rendezvous address and port and
broadcasts them over MPI; torch.distributed then starts as usual from the environment."""
from __future__ import annotations

import ipaddress
import os
import socket


def _reachable_address(hosts: list[str]) -> str:
    """Rank 0's address as the other hosts should dial it.

    All ranks on one host: loopback. Otherwise rank 0's name, unless it resolves to loopback (Debian
    maps the hostname to 127.0.1.1), in which case the address of the interface that routes to
    another rank's host (a UDP connect sends nothing).
    """
    me = hosts[0]
    if all(h == me for h in hosts):
        return "127.0.0.1"
    try:
        addr = socket.gethostbyname(me)
    except OSError:
        addr = "127.0.0.1"
    if not ipaddress.ip_address(addr).is_loopback:
        return addr
    other = next(h for h in hosts if h != me)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(other), 9))
        return s.getsockname()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def bootstrap_from_mpi(port: int | None = None) -> None:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from mpi4py.

    MASTER_ADDR / MASTER_PORT already in the environment (`mpirun -x`) are kept. Needs
    `pip install .[mpi]` and an MPI library.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("MPI bootstrap needs mpi4py: pip install 'erc-megatron[mpi]' "
                           "(and an MPI library, e.g. apt-get install openmpi-bin)") from exc
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    hosts = comm.allgather(socket.gethostname())
    info = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or _reachable_address(hosts)
        if port is None:
            port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else _free_port()
        info = (addr, port)
    addr, port = comm.bcast(info, root=0)
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()),
                      LOCAL_RANK=str(local.Get_rank()), LOCAL_WORLD_SIZE=str(local.Get_size()),
                      MASTER_ADDR=addr, MASTER_PORT=str(port))
    local.Free()


def main(argv: list[str] | None = None) -> int:
    """`mpirun -np N python -m erc_megatron.dist.mpi train --config ...`: bootstrap, then the CLI."""
    bootstrap_from_mpi()
    from erc_megatron.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
