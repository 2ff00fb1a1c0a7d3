"""Hugging Face transformers models, built from small configs (no weights downloaded), which
torch.fx cannot trace: fxlra.compile captures them with torch.export by default, and their
generated program's updates equal the reference interpreter's on the same ATen graph, at the
example's batch size and at another."""
import pytest
import torch

import fxlra
from helpers import assert_matches_reference

T = pytest.importorskip("transformers")

SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def _bert():
    config = T.BertConfig(vocab_size=40, num_labels=3, max_position_embeddings=16, **SMALL)
    return T.BertForSequenceClassification(config), "ids", 3


def _gpt2():
    config = T.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                          bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config), "ids", 40


def _vit():
    config = T.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=5, **SMALL)
    return T.ViTForImageClassification(config), "image", 5


def _llama():
    config = T.LlamaConfig(vocab_size=40, max_position_embeddings=16, num_key_value_heads=1,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, **SMALL)
    return T.LlamaForCausalLM(config), "ids", 40


MODELS = {"bert": _bert, "gpt2": _gpt2, "vit": _vit, "llama": _llama}
# the norm that reads the residual stream's sites (fxlra/analysis/normed.py): BERT normalises
# after each residual add (its sites are the norms' outputs), the others before each block;
# Llama's RMSNorm is written out as pow / mean / rsqrt
NORMED = {"bert": set(), "gpt2": {"layer"}, "vit": {"layer"}, "llama": {"rms"}}


def _batch(kind, classes, batch, tokens):
    if kind == "image":
        return torch.randn(batch, 3, 8, 8, dtype=torch.float64), torch.randint(0, classes, (batch,))
    x = torch.randint(0, 40, (batch, 6))
    return x, torch.randint(0, classes, (batch, 6) if tokens else (batch,))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_hugging_face_model_compiles_through_export_and_matches_the_reference(name):
    torch.manual_seed(0)
    model, kind, classes = MODELS[name]()
    model = model.double().train()
    tokens = name in ("gpt2", "llama")
    x, y = _batch(kind, classes, 3, tokens)
    prog = fxlra.compile(model, example_inputs=x)
    assert prog.frontend == "export" and "torch.fx could not trace it" in repr(prog)
    assert {kind for _, kind, _ in prog.plan.normed} == NORMED[name]
    names = {f"model.{n}" for n, p in model.named_parameters()}
    assert names <= set(dict(prog.named_parameters()))
    assert_matches_reference(prog, x, y, seed=0)           # dropout draws the same masks
    x, y = _batch(kind, classes, 5, tokens)                # another batch size
    assert_matches_reference(prog, x, y, seed=1)
    opt = torch.optim.Adam(prog.parameters(), lr=1e-3)
    out = prog.step(x, y)
    opt.step()
    assert torch.isfinite(torch.as_tensor(out.loss))
