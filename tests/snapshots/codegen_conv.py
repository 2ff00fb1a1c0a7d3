def rec_lra_updates(input_1, labels):
    """rec-LRA updates for Sequential: 2 sites, 1 error synapse(s), wiring pairwise."""
    # forward: every value the updates read is kept until its last use
    _0 = m_0(input_1)
    _1 = m_1(_0)
    _2 = m_2(_1)
    _3 = m_3(_2)
    _4 = m_4(_3)
    del _3
    _5 = m_5(_4)
    # site _5 (output): e = softmax(v) - onehot(y)
    target__5 = rules.targets_for(_5, labels, 'cross_entropy')
    del labels
    err__5, loss__5 = rules.output_error(_5, target__5, 'cross_entropy')
    del target__5
    # wave 1: _2
    # site _2 (depth 1, error from _5)
    disp__2 = syn.apply(syn__5__to___2, err__5, _2.shape)
    target__2 = m_2((_1 - 0.1 * disp__2))
    del disp__2
    err__2 = rules.inner_error(_2, target__2, 1.0, 1.0)
    del target__2
    # site _2: local updates of _0, _1
    cot__1 = err__2
    del _1
    grads__1 = local.batchnorm_grads(m_1, _0, cot__1)
    cot__0 = cot__1
    del _0, cot__1
    grads__0 = local.conv_grads(m_0, input_1, cot__0)
    del cot__0, input_1
    # site _5: local updates of _5
    grads__5 = local.linear_grads(m_5, _4, err__5)
    del _4
    # error synapse _5 -> _2 (hebbian-z)
    synapse_grads__5__to___2 = syn.weight_grads(syn__5__to___2, err__5, _2)
    del _2
    # raw updates, averaged over the batch (one multi-tensor scale)
    batch = _5.shape[0]
    del _5
    updates = [grads__1['weight'], grads__1['bias'], grads__0['weight'], grads__0['bias'], grads__5['weight'], grads__5['bias'], synapse_grads__5__to___2[0]]
    del grads__0, grads__1, grads__5, synapse_grads__5__to___2
    torch._foreach_mul_(updates, [s / batch for s in SCALES])
    del batch
    return loss__5, {'_2': err__2, '_5': err__5}, updates
