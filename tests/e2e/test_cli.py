"""The command line as an operator meets it, through real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from syncd.emulators.serving import free_port

pytestmark = pytest.mark.e2e


def syncd(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_refuses_a_bad_config_naming_file_and_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nport = "eighty"\n[sources.hd]\nsecret = "${NOT_SET_ANYWHERE_42}"\n')
    result = syncd("run", "-c", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{cfg}: server.port" in result.stderr
    assert (
        f"{cfg}: sources.hd.secret: environment variable NOT_SET_ANYWHERE_42 is not set"
        in result.stderr
    )
    assert not (tmp_path / "syncd.db").exists()  # refused before touching the store


def test_second_daemon_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "syncd.toml"
    cfg.write_text(f'[server]\nport = {free_port()}\n[store]\nurl = "sqlite:///syncd.db"\n')
    first = subprocess.Popen(
        [sys.executable, "-m", "syncd.cli", "run", "-c", str(cfg)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stderr is not None
        for line in first.stderr:
            if "syncd_started" in line:
                break
        cfg2 = tmp_path / "second.toml"
        cfg2.write_text(f'[server]\nport = {free_port()}\n[store]\nurl = "sqlite:///syncd.db"\n')
        second = syncd("run", "-c", str(cfg2), cwd=tmp_path, timeout=30)
        assert second.returncode == 1 and "another syncd process is already using" in second.stderr
    finally:
        first.terminate()
        assert first.wait(20) == 0


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = syncd(
        "demo",
        "--dir",
        str(tmp_path),
        "--port",
        str(free_port()),
        "--tickets",
        "12",
        "--exit-when-done",
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "one deal per ticket in both CRMs: True" in result.stdout
    assert "went to quarantine" in result.stdout
    assert (tmp_path / "syncd-demo.db").exists()
