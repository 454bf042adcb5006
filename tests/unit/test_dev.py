"""`fogline dev`'s pieces that need no processes: what it shows of an app, which file
changes reload it, the log tail. The whole command runs in tests/integration/test_dev.py."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from watchfiles import Change

from fogline.errors import ConfigError
from fogline.sim.dev import AppInfo, DevConfig, SourceFilter, banner, inspect_app, tail_log

ROOT = Path(__file__).resolve().parents[2]
FACTORY = ROOT / "examples" / "factory"


def test_inspect_app_reads_routes_and_topic_filters_from_the_code() -> None:
    info = inspect_app(FACTORY)
    assert (info.name, info.version) == ("factory", "0.1.0")
    assert info.routes == (("GET", "/machines"), ("GET", "/machines/{machine}"))
    assert info.topics == ("factory/+/vibration",)


def test_inspect_app_names_the_file_and_field(tmp_path: Path) -> None:
    app = tmp_path / "factory"
    shutil.copytree(FACTORY, app)
    manifest = app / "fogline.yaml"
    manifest.write_text(manifest.read_text().replace("factory_app:app", "factory_app"))
    with pytest.raises(ConfigError, match=r"fogline\.yaml: spec\.entrypoint: must be"):
        inspect_app(app)


def test_inspect_app_imports_from_the_app_directory(tmp_path: Path) -> None:
    """Workers run with the app directory as their working directory; so does the check."""
    app = tmp_path / "factory"
    shutil.copytree(FACTORY, app)
    (app / "limits.txt").write_text("3\n")
    source = app / "factory_app.py"
    source.write_text(source.read_text()
                      + '\nimport pathlib\nLIMIT = int(pathlib.Path("limits.txt").read_text())\n')
    assert inspect_app(app).name == "factory"


def test_only_python_files_and_the_manifest_reload(tmp_path: Path) -> None:
    accepts = SourceFilter(tmp_path)
    assert accepts(Change.modified, str(tmp_path / "app.py"))
    assert accepts(Change.deleted, str(tmp_path / "pkg" / "helpers.py"))
    assert accepts(Change.modified, str(tmp_path / "fogline.yaml"))
    assert not accepts(Change.modified, str(tmp_path / "pkg" / "fogline.yaml"))
    assert not accepts(Change.modified, str(tmp_path / "data.json"))
    assert not accepts(Change.added, str(tmp_path / "__pycache__" / "app.cpython-311.py"))
    assert not accepts(Change.modified, str(tmp_path / ".app.py.swp"))


def test_the_banner_shows_every_url_a_developer_needs(tmp_path: Path) -> None:
    info = AppInfo("factory", "0.1.0", (("GET", "/machines"), ("POST", "/machines/{m}")),
                   ("factory/+/vibration", "factory/+/status"))
    lines = banner(info, "http://127.0.0.1:8787", "mqtt://dev:secret@127.0.0.1:1883",
                   "http://127.0.0.1:8700", tmp_path, True, tmp_path / "factory")
    text = "\n".join(lines)
    assert "  app     http://127.0.0.1:8787/factory/\n" in text
    assert "  route   GET     http://127.0.0.1:8787/factory/machines\n" in text
    assert "          POST    http://127.0.0.1:8787/factory/machines/{m}\n" in text
    assert "topics: factory/+/vibration, factory/+/status" in text
    assert "secret" not in text
    assert "http://127.0.0.1:8700" in text
    assert str(tmp_path / "node.log") in text and "removed at exit" in text


def test_config_is_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--port"):
        DevConfig(tmp_path, port=70000)
    with pytest.raises(ConfigError, match="mqtt://"):
        DevConfig(tmp_path, mqtt_url="http://127.0.0.1:1883")


async def test_the_log_tail_echoes_whole_lines_from_the_offset(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    log.write_text("from an earlier run\n")
    seen: list[str] = []
    tail = asyncio.create_task(tail_log(log, log.stat().st_size, seen.append))
    try:
        with open(log, "a") as file:
            file.write("first\nsec")
            file.flush()
            await asyncio.sleep(0.3)
            assert seen == ["first"]
            file.write("ond\n")
        await asyncio.sleep(0.3)
        assert seen == ["first", "second"]
    finally:
        tail.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tail
