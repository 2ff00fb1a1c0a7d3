def rec_lra_updates(input_1, labels):
    """rec-LRA updates for Sequential: 2 sites, 1 error synapse(s), wiring pairwise."""
    # forward: every value the updates read is kept until its last use
    _0 = m_0(input_1)
    _1 = m_1(_0)
    # site _1 (output): e = softmax(v) - onehot(y)
    target__1 = rules.targets_for(_1, labels, 'cross_entropy')
    del labels
    err__1, loss__1 = rules.output_error(_1, target__1, 'cross_entropy')
    del target__1
    # wave 1: _0
    # site _0 (depth 1, error from _1)
    disp__0 = syn.apply(syn__1__to___0, err__1, _0.shape)
    target__0 = _0 - 0.1 * disp__0
    del disp__0
    err__0 = rules.inner_error(_0, target__0, 1.0, 1.0)
    del target__0
    # site _0: local updates of _0
    grads__0 = local.linear_grads(m_0, input_1, err__0)
    del input_1
    # site _1: local updates of _1
    grads__1 = local.linear_grads(m_1, _0, err__1)
    # error synapse _1 -> _0 (hebbian-z)
    synapse_grads__1__to___0 = syn.weight_grads(syn__1__to___0, err__1, _0)
    del _0
    # raw updates, averaged over the batch (one multi-tensor scale)
    batch = _1.shape[0]
    del _1
    updates = [grads__0['weight'], grads__0['bias'], grads__1['weight'], grads__1['bias'], synapse_grads__1__to___0[0]]
    del grads__0, grads__1, synapse_grads__1__to___0
    torch._foreach_mul_(updates, [s / batch for s in SCALES])
    del batch
    return loss__1, {'_0': err__0, '_1': err__1}, updates
