"""Slurm host-list expansion (erc_megatron.dist.nodelist) against fixed answers and against Slurm's own
`scontrol show hostnames` on the same lists."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from erc_megatron.dist.nodelist import expand_slurm_nodelist
from tests.launch.common import LOCAL_CLUSTER, REPO, missing

CASES = {
    "node[01-03,07],gpu5": ["node01", "node02", "node03", "node07", "gpu5"],
    "a1": ["a1"],
    "h[1]": ["h1"],
    "a[9-11]": ["a9", "a10", "a11"],  # width of the lower bound: no padding
    "n[008-011]": ["n008", "n009", "n010", "n011"],
    "gpu-[1-2],cpu-a": ["gpu-1", "gpu-2", "cpu-a"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    "n[1-3],m[01-02]x[3-4]": ["n1", "n2", "n3", "m01x3", "m01x4", "m02x3", "m02x4"],
    "x,y,z": ["x", "y", "z"],
}


@pytest.mark.parametrize("nodelist", sorted(CASES))
def test_expansion(nodelist):
    assert expand_slurm_nodelist(nodelist) == CASES[nodelist]


@pytest.mark.parametrize("bad, needle", [("node[01-03", "'[' without ']'"), ("node01]", "']' without '['"),
                                         ("node[a-b]", "bad range 'a-b'"), ("node[5-3]", "goes down")])
def test_malformed_lists_are_refused_with_the_list_named(bad, needle):
    with pytest.raises(ValueError, match=r"host list .*" + __import__("re").escape(needle)):
        expand_slurm_nodelist(bad)


def test_command_line_prints_one_host_per_line_without_importing_torch():
    out = subprocess.run([sys.executable, "-m", "erc_megatron.dist.nodelist", "rack[1-2]-n[1-2]"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.split() == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"], out
    assert not out.stderr, out.stderr  # no runpy warning about a module imported twice
    probe = subprocess.run([sys.executable, "-c", "import sys, erc_megatron.dist, erc_megatron.dist.nodelist; "
                            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"],
                           capture_output=True, text=True, cwd=REPO)
    assert probe.stdout.strip() == "[]", probe
    bad = subprocess.run([sys.executable, "-m", "erc_megatron.dist.nodelist", "n[1-"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 1 and "host list 'n[1-'" in bad.stderr, bad.stderr


def test_same_hosts_as_scontrol(tmp_path):
    if not shutil.which("scontrol"):
        missing("Slurm's scontrol", f"bash {LOCAL_CLUSTER.relative_to(REPO)} install")
    # scontrol only parses here, but it will not start without some slurm.conf
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=parse\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    for nodelist, want in CASES.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == want == expand_slurm_nodelist(nodelist), nodelist
