"""The serving runtime through ONNX Runtime: incremental == full, batching, integrity,
state serialisation, and that it imports without torch.

Artifacts are exported once per module (a lifelong model and one with a decay head).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ifa_common import hashing
from ifa_common.manifest import (
    ArtifactError,
    ArtifactHashMismatch,
    ArtifactMissing,
    ArtifactWrongModel,
    sha256_file,
)
from ifa_common.records import make_events
from ifa_common.state import EMPTY_LOG_SCALE, StateVersionMismatch, UserState
from service.engine.runtime import ModelRuntime

torch = pytest.importorskip("torch")

from model_export.batch import UserBatch  # noqa: E402
from model_export.export import export_model  # noqa: E402
from model_export.model import build_model, default_config  # noqa: E402

T0 = 1_700_000_000
ITEMS = np.arange(0, 3000, 3, dtype=np.int64)  # the item table: every third id is known
CATS = (ITEMS // 7) % 40


def _export(root: Path, decay: tuple[float, float], seed: int) -> tuple[ModelRuntime, Any]:
    cfg = default_config(
        item_buckets=1009, category_buckets=17, action_buckets=5, d_model=12, heads=2,
        d_head=4, mlp_hidden=(16,), dropout=0.0, decay_per_day=decay, cat_slots=5,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # untrained weights are near zero: make them matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = export_model(model, cfg, root, f"v{seed}", (ITEMS, CATS), {"data_id": "t"})
    return ModelRuntime.load(root, path.name, prefer_cuda=False), model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelRuntime, Any]]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "lifelong": _export(root, (0.0, 0.0), 1),
        "decay": _export(root, (0.0, 2.0), 2),  # one lifelong head, one with a 12 h half-life
    }


@pytest.fixture(scope="module")
def rt(artifacts: dict[str, tuple[ModelRuntime, Any]]) -> ModelRuntime:
    return artifacts["decay"][0]


def _events(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 4000, n)  # about a quarter are in the item table
    cats = np.where(rng.random(n) < 0.5, -1, rng.integers(0, 40, n))  # -1: look it up
    ts = T0 + np.sort(rng.integers(0, 400 * 86_400, n))
    return make_events(items, ts, category=cats, action=rng.integers(0, 6, n))


def _close(a: UserState, b: UserState, rtol: float = 1e-5) -> None:
    """Equal true sums exp(m) * S (and z), relative to each head's largest entry."""
    assert (a.n, a.t_ref) == (b.n, b.t_ref)
    scale = np.exp(a.m.astype(np.float64) - b.m.astype(np.float64))  # (H,)
    for x, y in ((a.S, b.S), (a.z, b.z)):
        xs = x * scale.reshape((-1,) + (1,) * (x.ndim - 1))
        ref = np.abs(y).reshape(y.shape[0], -1).max(axis=1).reshape((-1,) + (1,) * (y.ndim - 1))
        assert np.all(np.abs(xs - y) <= rtol * ref + 1e-30)


def _torch_forward(
    rt: ModelRuntime, model: Any, events: np.ndarray, items: np.ndarray
) -> np.ndarray:
    """The PyTorch model's forward on the whole sequence (one request after it)."""

    d = rt.manifest["dims"]
    known = dict(zip(ITEMS.tolist(), CATS.tolist(), strict=True))
    ev_cat = np.array(
        [
            c if c >= 0 else known.get(int(i), -1)
            for i, c in zip(events["item_id"], events["category"], strict=True)
        ],
        dtype=np.int64,
    )
    cand_cat = np.array([known.get(int(i), -1) for i in items], dtype=np.int64)
    t = torch.from_numpy
    batch = UserBatch(
        ev_item=t(hashing.item_bucket(events["item_id"], d["item_buckets"])),
        ev_cat=t(hashing.category_bucket(ev_cat, d["category_buckets"])),
        ev_action=t(hashing.action_bucket(events["action"], d["action_buckets"])),
        ev_ts=t(np.ascontiguousarray(events["ts"])),
        req_prefix=torch.tensor([len(events)]),
        cand_item=t(hashing.item_bucket(items, d["item_buckets"]))[None],
        cand_cat=t(hashing.category_bucket(cand_cat, d["category_buckets"]))[None],
        cand_mask=torch.ones(1, len(items), dtype=torch.bool),
        label=torch.zeros(1, len(items)),
        exposed=torch.ones(1, len(items), dtype=torch.bool),
    )
    with torch.no_grad():
        return np.asarray(model(batch)[0].numpy())


@pytest.mark.parametrize("kind", ["lifelong", "decay"])
@pytest.mark.parametrize("split", ["0", "1", "middle", "last"])
def test_incremental_equals_full(
    artifacts: dict[str, tuple[ModelRuntime, Any]], kind: str, split: str
) -> None:
    rt, model = artifacts[kind]
    events = _events(2000, seed=3)
    k = {"0": 0, "1": 1, "middle": 1000, "last": 1999}[split]
    full = rt.build_state(events)
    folded = rt.fold(rt.build_state(events[:k]), rt.build_state(events[k:]))
    _close(folded, full)
    items = np.arange(0, 6000, 7, dtype=np.int64)
    want = _torch_forward(rt, model, events, items)
    np.testing.assert_allclose(rt.score(folded, items), want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(rt.score(full, items), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["lifelong", "decay"])
def test_many_small_folds_and_chunking(
    artifacts: dict[str, tuple[ModelRuntime, Any]], kind: str
) -> None:
    rt, _ = artifacts[kind]
    events = _events(3000, seed=4)
    full = rt.build_state(events)
    state = rt.empty_state()
    for start in range(0, 3000, 100):  # the service's path: small tails folded into a cache
        state = rt.fold(state, rt.build_state(events[start : start + 100]))
    _close(state, full)
    chunked = ModelRuntime.load_dir(rt.version_dir, prefer_cuda=False, chunk_events=700)
    _close(chunked.build_state(events), full)


def test_empty_history_and_unknown_ids(rt: ModelRuntime) -> None:
    empty = rt.build_state(make_events([], []))
    assert empty.n == 0 and empty.t_ref == 0
    assert (
        not empty.S.any() and not empty.z.any() and np.all(empty.m == np.float32(EMPTY_LOG_SCALE))
    )
    items = np.array([0, 3, 2**62, 2**63 - 1, 5, 5], dtype=np.int64)
    for state in (empty, rt.empty_state(), rt.deserialize_state(rt.serialize_state(empty))):
        logits = rt.score(state, items)
        assert logits.shape == (6,) and logits.dtype == np.float32 and np.all(np.isfinite(logits))
        assert logits[4] == logits[5]
    unknown = make_events([2**62, 2**63 - 1], [T0, T0 + 5], category=[-1, 2**40], action=[99, 0])
    logits = rt.score(rt.build_state(unknown), items)
    assert np.all(np.isfinite(logits))
    assert rt.score(empty, np.zeros(0, np.int64)).shape == (0,)


def test_categories_come_from_the_item_table(rt: ModelRuntime) -> None:
    np.testing.assert_array_equal(
        rt.lookup_categories(np.array([0, 3, 4, 2**62, 2997])), [0, 0, -1, -1, CATS[-1]]
    )
    events = _events(300, seed=5)
    explicit = events.copy()
    explicit["category"] = np.where(
        events["category"] < 0, rt.lookup_categories(events["item_id"]), events["category"]
    )
    a, b = rt.build_state(events), rt.build_state(explicit)
    np.testing.assert_array_equal(a.S, b.S)


def test_score_batch_equals_per_user(rt: ModelRuntime) -> None:
    states = [rt.empty_state(), rt.build_state(_events(10, 6)), rt.build_state(_events(500, 7))]
    rng = np.random.default_rng(8)
    cands = [rng.integers(0, 5000, m) for m in (1, 37, 5)]
    got = rt.score_batch(states, cands)
    assert [g.shape for g in got] == [(1,), (37,), (5,)]
    for state, items, logits in zip(states, cands, got, strict=True):
        np.testing.assert_allclose(logits, rt.score(state, items), rtol=0, atol=1e-5)
    assert rt.score_batch([], []) == []


def test_concurrent_calls(rt: ModelRuntime) -> None:
    state = rt.build_state(_events(200, 9))
    items = np.arange(500, dtype=np.int64)
    want = rt.score(state, items)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: rt.score(state, items), range(16)))
    for out in outs:
        np.testing.assert_array_equal(out, want)


def test_state_serialisation(
    artifacts: dict[str, tuple[ModelRuntime, Any]], tmp_path: Path
) -> None:
    rt = artifacts["decay"][0]
    state = rt.build_state(_events(50, 10))
    buf = rt.serialize_state(state)
    back = rt.deserialize_state(buf)
    assert rt.serialize_state(back) == buf
    assert (back.n, back.t_ref) == (50, state.t_ref)
    for x, y in ((back.S, state.S), (back.z, state.z), (back.m, state.m)):
        np.testing.assert_array_equal(x, y)
    other = _copy_version(rt, tmp_path, "another-version")
    with pytest.raises(StateVersionMismatch):
        ModelRuntime.load(tmp_path, "another-version", prefer_cuda=False).deserialize_state(buf)
    with pytest.raises(StateVersionMismatch):  # the two test models too
        artifacts["lifelong"][0].deserialize_state(buf)
    assert other.is_dir()


def _copy_version(rt: ModelRuntime, root: Path, name: str) -> Path:
    dst = root / name
    shutil.copytree(rt.version_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_integrity_errors(rt: ModelRuntime, tmp_path: Path) -> None:
    tampered = _copy_version(rt, tmp_path, "tampered")
    data = bytearray((tampered / "scorer.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "scorer.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactHashMismatch):
        ModelRuntime.load(tmp_path, "tampered", prefer_cuda=False)

    missing = _copy_version(rt, tmp_path, "missing")
    (missing / "items.npz").unlink()
    with pytest.raises(ArtifactMissing):
        ModelRuntime.load(tmp_path, "missing", prefer_cuda=False)

    wrong = _copy_version(rt, tmp_path, "wrong")
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["model_type"] = "din"
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactWrongModel):
        ModelRuntime.load(tmp_path, "wrong", prefer_cuda=False)

    with pytest.raises(ArtifactMissing):  # no `latest` in this directory
        ModelRuntime.load(tmp_path, None, prefer_cuda=False)


def test_hash_consistent_but_malformed_artifacts_are_artifact_errors(
    rt: ModelRuntime, tmp_path: Path
) -> None:
    """A writer of the directory can make files whose hashes match the manifest; each
    such malformation is refused by name (the admin reload answers it with a 422)."""
    no_heads = _copy_version(rt, tmp_path, "no_heads")
    manifest = json.loads((no_heads / "manifest.json").read_text())
    del manifest["dims"]["heads"]
    (no_heads / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest dims unusable.*heads"):
        ModelRuntime.load(tmp_path, "no_heads", prefer_cuda=False)

    a_list = _copy_version(rt, tmp_path, "a_list")
    (a_list / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object, not list"):
        ModelRuntime.load(tmp_path, "a_list", prefer_cuda=False)

    no_ids = _copy_version(rt, tmp_path, "no_ids")
    np.savez(no_ids / "items.npz", category=np.arange(3))
    manifest = json.loads((no_ids / "manifest.json").read_text())
    manifest["files"]["items.npz"] = sha256_file(no_ids / "items.npz")
    (no_ids / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no item_id"):
        ModelRuntime.load(tmp_path, "no_ids", prefer_cuda=False)


def test_symlinks_out_of_the_artifacts_dir_are_refused(rt: ModelRuntime, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    real = _copy_version(rt, outside, "v7")
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "v7").symlink_to(real)
    with pytest.raises(ArtifactError, match="resolves outside"):
        ModelRuntime.load(root, "v7", prefer_cuda=False)
    files = _copy_version(rt, root, "v9")
    (files / "items.npz").unlink()
    (files / "items.npz").symlink_to(real / "items.npz")  # same bytes, outside the version
    with pytest.raises(ArtifactError, match=r"items\.npz resolves outside"):
        ModelRuntime.load(root, "v9", prefer_cuda=False)


def test_load_latest_providers_and_warmup(rt: ModelRuntime) -> None:
    root = rt.version_dir.parent
    latest = ModelRuntime.load(root, None, intra_op_threads=2, prefer_cuda=True)
    assert latest.version == (root / "latest").read_text().strip()
    assert latest.provider in ("cpu", "cuda") and latest.providers
    assert latest.dims == rt.dims and latest.decay.dtype == np.float64
    warm = latest.warmup(candidate_counts=(1, 100))
    assert set(warm.score_ms) == {1, 100} and set(warm.build_ms) == {0, 256, 4096}
    assert all(ms > 0 for ms in [*warm.score_ms.values(), *warm.build_ms.values()])
    assert warm.chunk_events == latest._chunk


def test_cpu_sessions_run_without_the_python_wrapper(rt: ModelRuntime) -> None:
    """`runner` calls a CPU session's compiled run: the same outputs, bit for bit, as
    `InferenceSession.run`, and a feed ORT cannot run is still refused (by its C++ checks)."""
    from ifa_common.graphs import SCORER_FILE, SCORER_OUTPUTS, STATE_FILE, STATE_OUTPUTS
    from service.engine.ort_session import CPU, open_session, runner, session_options

    opts = session_options(1)
    scorer = open_session(rt.version_dir / SCORER_FILE, opts, [CPU])
    state = open_session(rt.version_dir / STATE_FILE, opts, [CPU])
    run_scorer, run_state = runner(scorer), runner(state)
    assert run_scorer != scorer.run and run_state != state.run  # the direct path was taken
    events = _events(300)
    built = rt.build_state(events)
    items = np.arange(0, 400, 7, dtype=np.int64)
    m = items.shape[0]
    feeds = {
        "S": built.S[None], "z": built.z[None], "m": built.m[None],
        "n": np.array([built.n], np.int64),
        "item": hashing.item_bucket(items, rt.manifest["dims"]["item_buckets"])[None],
        "category": np.ones((1, m), np.int64), "mask": np.ones((1, m), np.bool_),
    }  # fmt: skip
    assert np.array_equal(
        run_scorer(SCORER_OUTPUTS, feeds)[0], scorer.run(SCORER_OUTPUTS, feeds)[0]
    )
    d = rt.manifest["dims"]
    state_feeds = {
        "item": hashing.item_bucket(events["item_id"], d["item_buckets"]),
        "category": hashing.category_bucket(
            np.maximum(events["category"], 0), d["category_buckets"]
        ),
        "action": hashing.action_bucket(events["action"], d["action_buckets"]),
        "ts": np.ascontiguousarray(events["ts"]),
    }
    for a, b in zip(
        run_state(STATE_OUTPUTS, state_feeds), state.run(None, state_feeds), strict=True
    ):
        assert np.array_equal(a, b)
    with pytest.raises(Exception, match="mask"):  # a missing input, named
        run_scorer(SCORER_OUTPUTS, {k: v for k, v in feeds.items() if k != "mask"})
    # the runtime's own scoring: the public path's logits for its candidates
    item_b, cat_b = rt._candidates(items)
    public = scorer.run(SCORER_OUTPUTS, {**feeds, "item": item_b[None], "category": cat_b[None]})
    assert np.array_equal(rt.score(built, items), public[0][0])


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; import service, service.engine.runtime; "
        "bad = [m for m in ('torch', 'model_export', 'fastapi') if sys.modules.get(m) is not None]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
