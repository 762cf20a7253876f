"""scripts/bench_data_loading.py writes and reads every format on a few hundred records: each reader
hands out the same batches as LatentShards (checked against the records inside the script), every
record once per pass. A format whose package is not installed is skipped."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from .conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("bench_data_loading", REPO_ROOT / "scripts" / "bench_data_loading.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

EXPECTED_MODES = {"ours": {"random", "random-dl"}, "arrow": set(bench.MODES), "arrow3d": {"random"},
                  "mds": set(bench.MODES), "wds": {"stream", "stream-dl"}}


def test_bits_round_trip_bfloat16():
    x = torch.randn(3, 4, 2, 2).to(torch.bfloat16)
    a = bench.bits(x)
    assert a.dtype == np.uint16 and a.shape == (3, 4, 2, 2)
    assert torch.equal(bench.from_bits(a), x.float())


@pytest.mark.parametrize("name", bench.FORMATS)
def test_format_reads_every_record_once(name, tmp_path):
    pytest.importorskip(bench.PACKAGES[name])
    out = tmp_path / "result.json"
    result = bench.main(["--records", "200", "--latent-shape", "4,4,4", "--batch-size", "32", "--repeats", "1",
                         "--shard-records", "64", "--shuffle-buffer", "50", "--formats", name,
                         "--tmp", str(tmp_path), "--out", str(out)])
    entry = result["formats"][name]
    assert set(entry["modes"]) == EXPECTED_MODES[name]
    for mode, m in entry["modes"].items():
        assert m["records"] == 200 and m["unique_fraction"] == 1.0, mode
        assert m["median"] > 0
    # 200 records, 64 a shard (MDS cuts shards by bytes, so about that)
    assert entry["shards"] == 4 if name != "mds" else 3 <= entry["shards"] <= 5
    assert json.loads(out.read_text())["formats"][name]["modes"].keys() == entry["modes"].keys()
    assert f"| {name} |" in bench.table(result)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # the written files are removed


def test_a_batch_that_differs_from_the_records_is_caught():
    records = bench.make_records(10, (4, 2, 2))
    batch = bench.collate_rows([{"mean": bench.bits(records["mean"][i]), "std": bench.bits(records["std"][i]),
                                 "label": records["label"][i], "index": i, "caption": records["caption"][i]}
                                for i in (3, 7)])
    bench.check_batch(batch, records)
    batch["caption"] = batch["caption"][::-1]
    with pytest.raises(AssertionError, match="caption"):
        bench.check_batch(batch, records)
