"""What each launcher's environment tells a rank (erc_megatron.dist.startup.read_launch_env) and the
MPI bootstrap's choice of rendezvous address."""
from __future__ import annotations

import ipaddress
import socket

import pytest

from erc_megatron.dist.mpi import _reachable_address
from erc_megatron.dist.startup import read_launch_env
from erc_megatron.model.config import ConfigError


def test_srun_rank_reads_slurm_and_rendezvous_on_first_node_of_its_step():
    # the learner step runs on the job's nodes after the rollout node: rank 0 is on gpu2, not gpu1
    e = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[1-3]", "SLURM_STEP_NODELIST": "gpu[2-3]"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (9, 16, 1, "gpu2", 29500, "slurm")
    e = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "rack[1-2]-n[7-8]"})
    assert e.master_addr == "rack1-n7"
    e = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "a[1-2]",
                         "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "4242"})
    assert (e.master_addr, e.master_port) == ("10.0.0.5", 4242)


def test_mpi_ranks_open_mpi_mpich_and_bootstrapped():
    e = read_launch_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "h"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (3, 4, 1, "mpi")
    e = read_launch_env({"PMI_RANK": "2", "PMI_SIZE": "8", "MPI_LOCALRANKID": "2", "MASTER_ADDR": "h"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (2, 8, 2, "mpi")
    # after erc_megatron.dist.mpi.bootstrap_from_mpi: torchrun's variables, still reported as mpi
    e = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "MASTER_ADDR": "h"})
    assert (e.rank, e.world_size, e.launcher) == (1, 2, "mpi")
    with pytest.raises(ConfigError, match="bootstrap_from_mpi"):
        read_launch_env({"PMI_RANK": "0", "PMI_SIZE": "2"})
    with pytest.raises(ConfigError, match="PMI_SIZE"):
        read_launch_env({"PMI_RANK": "0", "MASTER_ADDR": "h"})


def _routable_local_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: needs a route, sends nothing
        except OSError:
            return None
        return s.getsockname()[0]


def test_mpi_rendezvous_address():
    assert _reachable_address(["n1", "n1", "n1"]) == "127.0.0.1"  # one host: loopback
    local = _routable_local_address()
    if local is None or ipaddress.ip_address(local).is_loopback:
        pytest.skip("this machine has no routable interface")
    # rank 0's name resolves to loopback here (/etc/hosts maps the hostname to 127.0.x.x on Debian):
    # the other hosts must get the interface address that routes to them instead
    addr = _reachable_address(["localhost", local])
    assert addr == local and not ipaddress.ip_address(addr).is_loopback
