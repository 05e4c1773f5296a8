"""One version source: erc_megatron.__version__ is what setup.py installed and what the CLI prints."""
import contextlib
import io
from importlib.metadata import version

import pytest

import erc_megatron
from erc_megatron import cli


def test_installed_metadata_and_cli_print_the_package_version():
    assert version("erc-megatron") == erc_megatron.__version__
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert out.getvalue().strip() == f"erc-megatron {erc_megatron.__version__}"
