def rec_lra_updates(input_1, labels):
    """rec-LRA updates for Sequential: 2 sites, 1 error synapse(s), wiring pairwise."""
    # forward: every value the updates read is kept until its last use
    _0 = m_0(input_1)
    _1 = m_1(_0)
    _2 = m_2(_1)
    # site _2 (output): e = softmax(v) - onehot(y)
    target__2 = rules.targets_for(_2, labels, 'cross_entropy')
    del labels
    err__2, loss__2 = rules.output_error(_2, target__2, 'cross_entropy')
    del target__2
    # wave 1: _1
    # site _1 (depth 1, error from _2)
    disp__1 = syn.apply(syn__2__to___1, err__2, _1.shape)
    target__1 = m_1((_0 - 0.1 * disp__1))
    del disp__1
    err__1 = rules.inner_error(_1, target__1, 1.0, 1.0)
    del target__1
    # site _1: local updates of _0
    cot__0 = err__1
    del _0
    grads__0 = local.linear_grads(m_0, input_1, cot__0)
    del cot__0, input_1
    # site _2: local updates of _2
    grads__2 = local.linear_grads(m_2, _1, err__2)
    # error synapse _2 -> _1 (hebbian-z)
    synapse_grads__2__to___1 = syn.weight_grads(syn__2__to___1, err__2, _1)
    del _1
    # raw updates, averaged over the batch (one multi-tensor scale)
    batch = _2.shape[0]
    del _2
    updates = [grads__0['weight'], grads__0['bias'], grads__2['weight'], grads__2['bias'], synapse_grads__2__to___1[0]]
    del grads__0, grads__2, synapse_grads__2__to___1
    torch._foreach_mul_(updates, [s / batch for s in SCALES])
    del batch
    return loss__2, {'_1': err__1, '_2': err__2}, updates
