"""torch.nn's transformer containers, traced through instead of kept as one op.

fx keeps every ``torch.nn`` module a leaf, so ``nn.TransformerEncoder(...)`` would be one op and
all its weights one site's, trained by the local VJP of the whole encoder (backprop through it).
fxlra traces these containers with the train-mode computation of their own ``forward`` (the
slow path: torch takes its fused fast path only in inference) written without the checks that
fx cannot trace, so that only their primitive modules (``Linear``, ``MultiheadAttention``, norms,
dropouts) stay leaves. A subclass that overrides ``forward`` is traced by its own code.
"""
from torch import nn


def _encoder_layer(m, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _encoder(m, src, mask=None, src_key_padding_mask=None, is_causal=None):
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                    is_causal=bool(is_causal))
    return out if m.norm is None else m.norm(out)


def _decoder(m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return out if m.norm is None else m.norm(out)


def _transformer(m, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                 src_key_padding_mask=None, tgt_key_padding_mask=None,
                 memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                 memory_is_causal=False):
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                       is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


# class -> its forward, traceable; TransformerDecoderLayer's own forward is traceable as it is
TRACE_THROUGH = {nn.TransformerEncoderLayer: _encoder_layer, nn.TransformerEncoder: _encoder,
                 nn.TransformerDecoderLayer: nn.TransformerDecoderLayer.forward,
                 nn.TransformerDecoder: _decoder, nn.Transformer: _transformer}


def traced_forward(module):
    """The forward fxlra traces for a container of the table (None: not one of them)."""
    if type(module) not in TRACE_THROUGH:
        return None
    fn = TRACE_THROUGH[type(module)]
    return lambda *args, **kwargs: fn(module, *args, **kwargs)
