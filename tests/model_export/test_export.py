"""`ifa-rank export`: checkpoint -> artifacts/<version>/, and ONNX Runtime == PyTorch.

One export per module (through the CLI handler, from a checkpoint on disk); parity is
checked on the artifact through the serving runtime at sizes not used at export time.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ifa_common import hashing  # noqa: E402
from ifa_common.manifest import sha256_file  # noqa: E402
from ifa_common.records import make_events  # noqa: E402
from model_export import commands  # noqa: E402
from model_export.export import export_checkpoint  # noqa: E402
from model_export.model import build_model, default_config  # noqa: E402
from model_export.onnx.graphs import ExportError  # noqa: E402
from service.engine.runtime import ModelRuntime  # noqa: E402

T0 = 1_700_000_000
ITEM_IDS = np.arange(10, 2010, 2, dtype=np.int64)
ITEM_CATS = ITEM_IDS % 23


def _config(**kw: Any) -> Any:
    base: dict[str, Any] = {
        "item_buckets": 2003, "category_buckets": 29, "action_buckets": 5, "d_model": 12,
        "heads": 2, "d_head": 4, "mlp_hidden": (16,), "dropout": 0.0, "cat_slots": 3,
        "use_mass": True,
    }  # fmt: skip
    base.update(kw)
    return default_config(**base)


def _checkpoint(path: Path, cfg: Any, model: Any) -> Path:
    torch.save(
        {
            "config": cfg.to_dict(),
            "state_dict": model.state_dict(),
            "model": cfg.model,
            "data_id": "synthetic-test",
            "metrics": {"test_auc": 0.75, "test_gauc": 0.7},
            "item_table": {
                "item_id": torch.from_numpy(ITEM_IDS[::-1].copy()),  # unsorted on purpose
                "category": torch.from_numpy(ITEM_CATS[::-1].copy()),
            },
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    tmp = tmp_path_factory.mktemp("export")
    cfg = _config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # untrained weights are near zero: make them matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ckpt = _checkpoint(tmp / "checkpoint.pt", cfg, model)
    out = tmp / "artifacts"
    rc = commands.export(argparse.Namespace(checkpoint=str(ckpt), out=str(out), version=None))
    assert rc == 0
    version = (out / "latest").read_text().strip()
    return out / version, cfg, model


def test_layout_and_manifest(exported: tuple[Path, Any, Any]) -> None:
    vdir, _, _ = exported
    assert re.fullmatch(r"ifa-\d{8}-\d{6}-[0-9a-f]{8}", vdir.name)
    assert sorted(p.name for p in vdir.parent.iterdir()) == sorted([vdir.name, "latest"])
    man = json.loads((vdir / "manifest.json").read_text())
    assert man["format"] == 1 and man["version"] == vdir.name and man["model_type"] == "ifa"
    assert man["config"]["model"] == "ifa" and man["opset"] >= 17 and man["created_at"]
    assert man["dims"] == {
        "heads": 2, "d_phi": 7, "d_head": 4, "d_model": 12, "item_buckets": 2003,
        "category_buckets": 29, "action_buckets": 5, "decay_per_second": [0.0, 0.0],
    }  # fmt: skip
    assert man["training"] == {
        "data_id": "synthetic-test",
        "metrics": {"test_auc": 0.75, "test_gauc": 0.7},
    }
    assert set(man["files"]) == {"state.onnx", "scorer.onnx", "items.npz"}
    for name, digest in man["files"].items():
        assert sha256_file(vdir / name) == digest
    state, scorer = man["graphs"]["state"], man["graphs"]["scorer"]
    assert [(i["name"], i["dtype"], i["shape"]) for i in state["inputs"]] == [
        (n, "int64", ["N"]) for n in ("item", "category", "action", "ts")
    ]
    assert [(o["name"], o["shape"]) for o in state["outputs"]] == [
        ("S", [2, 7, 4]), ("z", [2, 7]), ("m", [2]), ("t_ref", [])
    ]  # fmt: skip
    assert [i["name"] for i in scorer["inputs"]] == ["S", "z", "m", "n", "item", "category", "mask"]
    assert scorer["inputs"][0]["shape"] == ["B", 2, 7, 4]
    assert scorer["inputs"][6] == {"name": "mask", "dtype": "bool", "shape": ["B", "M"]}
    assert scorer["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["B", "M"]}]
    with np.load(vdir / "items.npz") as npz:
        np.testing.assert_array_equal(npz["item_id"], ITEM_IDS)
        np.testing.assert_array_equal(npz["category"], ITEM_CATS)


def _torch_reference(
    cfg: Any, model: Any, events: np.ndarray, items: np.ndarray
) -> tuple[Any, ...]:
    table = dict(zip(ITEM_IDS.tolist(), ITEM_CATS.tolist(), strict=True))
    ev_cat = np.array([table.get(int(i), -1) for i in events["item_id"]], dtype=np.int64)
    cand_cat = np.array([table.get(int(i), -1) for i in items], dtype=np.int64)
    t = torch.from_numpy
    with torch.no_grad():
        state = model.build_state(
            t(hashing.item_bucket(events["item_id"], cfg.item_buckets)),
            t(hashing.category_bucket(ev_cat, cfg.category_buckets)),
            t(hashing.action_bucket(events["action"], cfg.action_buckets)),
            t(np.ascontiguousarray(events["ts"])),
        )
        logits = model.score(
            *(x[None] for x in state[:3]),
            torch.tensor([len(events)]),
            t(hashing.item_bucket(items, cfg.item_buckets))[None],
            t(hashing.category_bucket(cand_cat, cfg.category_buckets))[None],
            torch.ones(1, len(items), dtype=torch.bool),
        )
    return tuple(x.numpy() for x in state), logits[0].numpy()


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 50_000])
def test_ort_equals_torch(exported: tuple[Path, Any, Any], n: int) -> None:
    vdir, cfg, model = exported
    rt = ModelRuntime.load(vdir.parent, None, prefer_cuda=False)
    rng = np.random.default_rng(n)
    events = make_events(
        rng.integers(0, 3000, n),  # known and unknown items; categories from the table
        T0 + np.sort(rng.integers(0, 300 * 86_400, n)),
        action=rng.integers(0, 7, n),
    )
    state = rt.build_state(events)
    for mc in (1, 37, 1000):
        items = rng.integers(0, 3000, mc)
        (S, _z, m, t_ref), want = _torch_reference(cfg, model, events, items)
        assert (state.n, state.t_ref) == (n, int(t_ref))
        # the graph may keep the state at another log-scale m (serving_state's fixed
        # shift): compare the true sums exp(m) * S
        S_true = S.astype(np.float64) * np.exp(m.astype(np.float64))[:, None, None]
        got_S = state.S.astype(np.float64) * np.exp(state.m.astype(np.float64))[:, None, None]
        np.testing.assert_allclose(
            got_S, S_true, rtol=1e-4, atol=1e-5 * max(1e-30, float(np.abs(S_true).max()))
        )
        got = rt.score(state, items)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_refuses_other_model_types(tmp_path: Path) -> None:
    cfg = _config(model="din")
    model = build_model(_config())
    ckpt = _checkpoint(tmp_path / "din.pt", cfg, model)
    with pytest.raises(ExportError, match="only 'ifa'"):
        export_checkpoint(ckpt, tmp_path / "out")
    rc = commands.export(
        argparse.Namespace(checkpoint=str(ckpt), out=str(tmp_path / "out"), version=None)
    )
    assert rc == 2
    assert not (tmp_path / "out" / "latest").exists()


def test_refuses_unsafe_or_missing_checkpoint(tmp_path: Path) -> None:
    cfg = _config()
    torch.save({"config": cfg, "state_dict": {}}, tmp_path / "pickled.pt")  # a class instance
    with pytest.raises(ExportError, match="weights_only"):
        export_checkpoint(tmp_path / "pickled.pt", tmp_path / "out")
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.pt", tmp_path / "out")


def test_refuses_existing_version(exported: tuple[Path, Any, Any], tmp_path: Path) -> None:
    vdir, cfg, model = exported
    ckpt = _checkpoint(tmp_path / "c.pt", cfg, model)
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(ckpt, vdir.parent, version=vdir.name)
    with pytest.raises(ExportError, match="invalid artifact version"):
        export_checkpoint(ckpt, vdir.parent, version="../escape")


def test_failed_verification_leaves_nothing(
    exported: tuple[Path, Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from model_export import export as ex

    vdir, cfg, model = exported
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "latest").write_text("previous\n")

    def copy_graphs(model: Any, cfg: Any, dst: Path) -> str:
        for name in ("state.onnx", "scorer.onnx"):
            shutil.copy(vdir / name, dst / name)
        return "dynamo"

    def fail(*args: Any, **kwargs: Any) -> float:
        raise ExportError("ONNX Runtime differs from PyTorch")

    monkeypatch.setattr(ex, "export_graphs", copy_graphs)
    monkeypatch.setattr(ex, "verify_export", fail)
    with pytest.raises(ExportError, match="differs"):
        ex.export_model(model, cfg, out, "v-bad", (ITEM_IDS, ITEM_CATS), {})
    assert sorted(p.name for p in out.iterdir()) == ["latest"]
    assert (out / "latest").read_text() == "previous\n"


def test_legacy_exporter_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_export import export as ex
    from model_export.onnx import graphs

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dynamo unavailable")

    monkeypatch.setattr(graphs, "_export_dynamo", broken)
    cfg = _config(decay_per_day=(0.0, 1.0))
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    path = ex.export_model(model, cfg, tmp_path, None, None, None)  # verified inside
    man = json.loads((path / "manifest.json").read_text())
    assert man["exporter"] == "legacy"
    assert man["graphs"]["scorer"]["outputs"][0]["shape"] == ["B", "M"]
    rt = ModelRuntime.load(tmp_path, None, prefer_cuda=False)
    assert rt.lookup_categories(np.array([10])).tolist() == [-1]  # no item table
    events = make_events(np.arange(3000), T0 + np.arange(3000) * 600)
    assert np.all(np.isfinite(rt.score(rt.build_state(events), np.arange(77))))
