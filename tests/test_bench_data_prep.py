"""scripts/bench_data_prep.py on a few hundred records: every stage runs in its own process and reports
its records, its skipped bad image and its peak memory (the figures themselves are not asserted)."""

import importlib.util

from .conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_data_prep", REPO_ROOT / "scripts" / "bench_data_prep.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_every_stage_reports_its_records_and_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BAD_EVERY", 100)  # records 99 and 199 hold bytes that are not an image
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    result = bench.main(["--records", "250", "--workers", "0", "--caption-shard-size", "100",
                         "--tmp", str(tmp_path), "--out", str(tmp_path / "out.json")])
    entry = result["sizes"][250]
    assert (entry["latents"]["records"], entry["latents"]["kept"], entry["latents"]["skipped"]) == (250, 248, 2)
    assert entry["captions"]["records"] == 248 and entry["captions"]["rows"] == 248 + 3  # "" once per shard
    assert entry["captions"]["batch_shape"] == [256, 16, 8]
    for stage in ("arrow", "latents", "captions"):
        assert entry[stage]["peak_rss_mb"] >= entry[stage]["peak_anon_mb"] > 0, stage
