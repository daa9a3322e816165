"""What C++ code writes to stderr while libtpu loads goes to run.log, not the console
(xgen/xla_logs.py: `native_stderr_to_run_log`, which task=plan wraps around libtpu's start)."""

import logging
import os

import pytest

from xgen.xla_logs import native_stderr_to_run_log


def test_lines_written_to_file_descriptor_2_go_to_the_run_log_and_not_the_console(tmp_path, capfd, caplog):
    capture = tmp_path / "libtpu.stderr"
    with caplog.at_level(logging.INFO, logger="xgen.file_only"):
        with native_stderr_to_run_log("libtpu", capture):
            os.write(2, b"E0000 common_lib.cc:554] unexpected worker hostname\n")  # as C++ writes: past sys.stderr
        os.write(2, b"after the block\n")
    assert capfd.readouterr().err == "after the block\n"  # fd 2 is the console's again
    [record] = caplog.records
    assert record.name == "xgen.file_only" and record.getMessage() == "libtpu wrote to stderr:\nE0000 common_lib.cc:554] unexpected worker hostname"
    assert not capture.exists()


def test_nothing_written_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="xgen.file_only"), native_stderr_to_run_log("libtpu", tmp_path / "libtpu.stderr"):
        pass
    assert caplog.records == []


def test_when_the_block_fails_its_lines_reach_the_console_too(tmp_path, capfd, caplog):
    """They may be why it failed (libtpu refusing a topology)."""
    with caplog.at_level(logging.INFO, logger="xgen.file_only"), pytest.raises(RuntimeError, match="refused"):
        with native_stderr_to_run_log("libtpu", tmp_path / "libtpu.stderr"):
            os.write(2, b"F0000 the reason\n")
            raise RuntimeError("refused")
    assert "F0000 the reason" in capfd.readouterr().err
    assert "F0000 the reason" in caplog.records[0].getMessage()
