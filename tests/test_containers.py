"""torch.nn's transformer containers are traced through: each attention, feed-forward Linear and
norm of every layer is its own op, with its own rule and site, not one leaf op for the whole
encoder (whose local VJP would be backprop through it)."""
import pytest
import torch
from torch import nn

import fxlra
from helpers import assert_matches_reference


class EncoderNet(nn.Module):
    """A small ViT-like model on (B, T, 4) token sequences."""

    def __init__(self, norm_first=False, final_norm=True):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if final_norm else
                                             None, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class DecoderNet(nn.Module):
    """Queries from the tokens, attending to a memory computed from them (cross-attention)."""

    def __init__(self):
        super().__init__()
        self.memory, self.query = nn.Linear(4, 16), nn.Linear(4, 16)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.decoder(self.query(x), torch.tanh(self.memory(x))).mean(1))


MODELS = {"encoder": EncoderNet, "encoder (norm first, no final norm)":
          lambda: EncoderNet(norm_first=True, final_norm=False), "decoder": DecoderNet}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_containers_are_traced_to_their_primitive_modules(name):
    model, x, y = MODELS[name](), torch.randn(3, 5, 4), torch.tensor([0, 1, 2])
    prog = fxlra.compile(model, example_inputs=x)
    # the traced program computes what the model computes (train mode, no dropout)
    torch.testing.assert_close(prog(x), model(x))
    rules = {r.param: r for r in prog.plan.params}
    container = "encoder" if "encoder" in name else "decoder"
    ops = {r.op for r in rules.values() if r.param.startswith(container)}
    # every Linear of every layer is an op of its own, with the linear rule
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and
               n.startswith(container) and not n.endswith("out_proj")]
    assert linears and all(rules[f"{n}.weight"].rule == "linear" for n in linears), \
        [(n, rules[f"{n}.weight"]) for n in linears]
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert {rules[f"{n}.in_proj_weight"].op for n in attention}.isdisjoint(
        {rules[f"{n}.weight"].op for n in linears})
    assert len(ops) >= 3 * len(attention), ops
    assert container not in ops                  # not one leaf op for the whole container
    assert_matches_reference(prog, x, y, "float32_long_sums")


def test_explain_names_no_local_vjp_of_a_whole_encoder():
    prog = fxlra.compile(EncoderNet(), example_inputs=torch.randn(2, 5, 4))
    lines = [line for line in prog.explain().splitlines() if line.startswith("model.encoder.")]
    local = [line.split()[0] for line in lines if "local VJP of the op" in line]
    # only the attention modules (no rule of their own) use their op's local VJP
    assert local and all(".self_attn." in n for n in local), local


def test_a_subclass_that_overrides_forward_is_traced_by_its_own_code():
    class Scaled(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return 2 * self._ff_block(self.norm2(self.norm1(src + self._sa_block(src, None, None))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Scaled(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(x).mean(1))
    model, x = Net(), torch.randn(2, 5, 8)
    prog = fxlra.compile(model, example_inputs=x)
    torch.testing.assert_close(prog(x), model(x))
