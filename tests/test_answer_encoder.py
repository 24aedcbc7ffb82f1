import pytest
import torch
from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

from qfusion.answer_encoder import AnswerEncoder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return BertModel.from_pretrained(path).eval()


IDS = torch.tensor([[2, 5, 7, 0, 0], [3, 9, 9, 4, 1]])
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("pooling", ["mean", "eos", "cls"])
def test_pooling_matches_a_manual_readout(bert, pooling):
    enc = AnswerEncoder(bert, contrastive_dim=8, pooling=pooling).eval()
    hidden = bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
    manual = {
        "mean": (hidden * MASK[..., None]).sum(1) / MASK.sum(1, keepdim=True),
        "eos": torch.stack([hidden[0, 2], hidden[1, 4]]),
        "cls": hidden[:, 0],
    }[pooling]
    want = torch.nn.functional.normalize(enc.projection(manual), dim=-1)
    torch.testing.assert_close(enc(IDS, MASK), want)


def test_padding_does_not_change_a_mean_pooled_answer(bert):
    enc = AnswerEncoder(bert, contrastive_dim=8).eval()
    short = enc(IDS[:1, :3], MASK[:1, :3])
    torch.testing.assert_close(enc(IDS[:1], MASK[:1]), short, rtol=1e-5, atol=1e-6)


def test_clip_text_model_uses_its_own_eos_pooler():
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=16, eos_token_id=49)).eval()
    enc = AnswerEncoder(clip, contrastive_dim=4, pooling="eos").eval()
    ids = torch.tensor([[3, 4, 49, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    pooled = clip(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(enc(ids, mask), torch.nn.functional.normalize(enc.projection(pooled), dim=-1))


def test_frozen_encoder_trains_only_the_projection(bert):
    enc = AnswerEncoder(bert, contrastive_dim=8, freeze_encoder=True)
    enc(IDS, MASK).sum().backward()
    assert enc.projection.weight.grad is not None
    assert all(p.grad is None for p in enc.encoder.parameters())
    enc.encoder.requires_grad_(True)


def test_bad_arguments_raise(bert):
    with pytest.raises(ValueError, match="pooling"):
        AnswerEncoder(bert, 8, pooling="max")
    with pytest.raises(TypeError, match="encoder"):
        AnswerEncoder(torch.nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match="attention_mask"):
        AnswerEncoder(bert, 8)(IDS, MASK[:, :3])


def test_input_embeddings_encoder_is_the_masked_mean_of_the_table_rows_projected():
    torch.manual_seed(0)
    table = torch.nn.Embedding(60, 16)
    enc = AnswerEncoder.from_input_embeddings(table, contrastive_dim=8)
    rows = table.weight.detach()
    manual = torch.stack([rows[[2, 5, 7]].mean(0), rows[[3, 9, 9, 4, 1]].mean(0)])
    want = torch.nn.functional.normalize(manual @ enc.projection.weight.T, dim=-1)
    torch.testing.assert_close(enc(IDS, MASK), want)


def test_input_embeddings_encoder_references_the_host_table_and_never_trains_it():
    torch.manual_seed(0)
    table = torch.nn.Embedding(60, 16)  # requires_grad stays on: the encoder must still not train it
    enc = AnswerEncoder.from_input_embeddings(table, contrastive_dim=8)
    assert list(enc.state_dict()) == ["projection.weight"]  # the host saves its table, not the encoder
    enc(IDS, MASK).sum().backward()
    assert enc.projection.weight.grad is not None and table.weight.grad is None
    before = enc(IDS, MASK).detach()
    with torch.no_grad():
        table.weight.mul_(2.0).add_(1.0)  # a reference, not a copy: the encoder sees the host's table
    assert not torch.allclose(enc(IDS, MASK), before)


def test_input_embeddings_encoder_pools_a_bfloat16_table_in_the_projection_dtype():
    torch.manual_seed(0)
    table = torch.nn.Embedding(60, 16)
    enc = AnswerEncoder.from_input_embeddings(table, contrastive_dim=8)
    want = enc(IDS, MASK)
    table.to(torch.bfloat16)
    got = enc(IDS, MASK)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 rounding of the table rows


def test_input_embeddings_needs_an_embedding_table():
    from qfusion.answer_encoder import InputEmbeddings

    with pytest.raises(TypeError, match="embeddings: expected an nn.Embedding"):
        InputEmbeddings(torch.nn.Linear(2, 2))
