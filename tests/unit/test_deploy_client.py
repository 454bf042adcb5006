"""Reading manifests for `fogline apply`: every rejection, and bundles without deploy fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fogline.bundle import create_key, unpack, verify
from fogline.deploy_client import app_bundle, apply_request, read_documents
from fogline.errors import ConfigError

APP = {"apiVersion": "fogline/v1", "kind": "App",
       "metadata": {"name": "shop", "version": "1.0"},
       "spec": {"entrypoint": "shop_app:app"}}


def write(path: Path, *docs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs))
    return path


def app_dir(root: Path, **spec: Any) -> Path:
    manifest = {**APP, "spec": {**APP["spec"], **spec}}
    write(root / "shop" / "fogline.yaml", manifest)
    (root / "shop" / "shop_app.py").write_text("from fogline import App\napp = App('shop')\n")
    return root / "shop"


def test_a_repository_of_manifests(tmp_path: Path) -> None:
    app_dir(tmp_path / "repo" / "apps")
    write(tmp_path / "repo" / "data" / "collections.yaml",
          {"apiVersion": "fogline/v1", "kind": "Collection", "metadata": {"name": "carts"},
           "spec": {"type": "counter", "scope": "global"}})
    write(tmp_path / "repo" / "ci" / "workflow.yml", {"on": "push"})  # not ours: skipped
    write(tmp_path / "repo" / ".git" / "x.yaml", {"apiVersion": "fogline/v1", "kind": "X"})
    docs = read_documents(tmp_path / "repo")
    assert [(d.kind, d.name) for d in docs] == [("App", "shop"), ("Collection", "carts")]


@pytest.mark.parametrize(("docs", "name", "message"), [
    ([{**APP, "kind": "Deployment"}], "fogline.yaml", "kind 'Deployment'"),
    ([APP], "shop.yaml", "is its app directory's fogline.yaml"),
    ([{**APP, "spec": {}}], "fogline.yaml", "spec.entrypoint"),
    ([{**APP, "spec": {"entrypoint": "a:b", "rollout": {"steps": [0]}}}], "fogline.yaml",
     "spec.rollout.steps"),
    ([{"apiVersion": "fogline/v1", "kind": "Collection", "metadata": {"name": "c"},
       "spec": {"type": "tree", "scope": "global"}}], "c.yaml", "type must be one of"),
    ([{"apiVersion": "fogline/v1", "kind": "Collection", "metadata": {"name": "c"},
       "spec": {"type": "map", "scope": "global", "extra": 1}}], "c.yaml", "extra"),
    ([{"apiVersion": "fogline/v1", "kind": "Collection", "metadata": {"name": "c"},
       "spec": {"type": "map", "scope": "global"}}] * 2, "c.yaml", "defined twice"),
    ([{"hello": "world"}], "x.yaml", "not a fogline manifest"),
    ([{"apiVersion": "fogline/v1", "kind": "Stream", "metadata": {"name": "t"},
       "spec": {"speed": 1}}], "s.yaml", "unknown fields speed"),
    ([{"apiVersion": "fogline/v1", "kind": "Stream", "metadata": {"name": "t"},
       "spec": {"bandwidth_bps": -1}}], "s.yaml", "bandwidth_bps"),
    ([{"apiVersion": "fogline/v1", "kind": "Stream", "metadata": {"name": "T.x"},
       "spec": {}}], "s.yaml", "invalid stream name"),
])
def test_rejections_name_the_file(tmp_path: Path, docs: list[Any], name: str,
                                  message: str) -> None:
    path = write(tmp_path / name, *docs)
    with pytest.raises(ConfigError, match=message):
        read_documents(path)


def test_nothing_to_apply_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no fogline manifests"):
        read_documents(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        read_documents(tmp_path / "missing")
    write(tmp_path / "bad.yaml").write_text("a: [")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        read_documents(tmp_path / "bad.yaml")


def test_deploy_fields_do_not_change_the_bundle(tmp_path: Path) -> None:
    plain = read_documents(app_dir(tmp_path / "a"))[0]
    staged = read_documents(app_dir(tmp_path / "b", rollout={"steps": [1, "50%"]},
                                    pins=[{"nodes": ["n"], "version": "0.9"}]))[0]
    assert app_bundle(plain).digest == app_bundle(staged).digest
    unpack(app_bundle(staged).data, tmp_path / "out")
    shipped = yaml.safe_load((tmp_path / "out" / "fogline.yaml").read_text())
    assert "rollout" not in shipped["spec"] and "pins" not in shipped["spec"]


def test_apply_request_is_signed_for_name_and_version(tmp_path: Path) -> None:
    key = tmp_path / "k" / "publisher.key"
    public = create_key(key)
    doc = read_documents(app_dir(tmp_path))[0]
    body = apply_request(doc, key, "because")
    verify({public.key_id: public.public_key}, body["key_id"], body["signature"], "shop",
           "1.0", body["digest"])
    assert body["reason"] == "because"
    with pytest.raises(ConfigError):
        apply_request(doc, tmp_path / "nokey", "")
