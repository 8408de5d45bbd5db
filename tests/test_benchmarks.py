"""benchmarks.run --quick: every stage reports, nothing silently missing."""
import json

from conftest import run_cli


def test_quick_benchmark_yields_complete_json(tmp_path):
    r = run_cli("benchmarks.run", "--quick", "--device", "cpu", "--json", tmp_path / "b.json",
                "--markdown", tmp_path / "b.md", "--plot", tmp_path / "b.png", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "b.json").read_text())
    recs = out["records"]
    stages = {x["stage"] for x in recs}
    assert {"read", "decode", "resize", "model", "classic", "loader", "train"} <= stages
    for x in recs:
        assert {"stage", "backend", "res", "batch_size", "device", "dtype", "img_per_s", "mb_per_s",
                "repeats", "environment"} <= set(x)
        if x.get("skipped"):
            assert x["img_per_s"] is None and x["skipped"]
        else:
            assert x["img_per_s"] > 0 and x["repeats"] >= 1
    assert any(x["stage"] == "copy" and "no CUDA" in x.get("skipped", "") for x in recs)
    assert out["environment"]["torch"] and out["environment"]["cores"] >= 1
    assert "| stage |" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.png").stat().st_size > 1000
