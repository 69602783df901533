import torch

from atlasdgd.optim.row_adam import RepresentationTable


def test_row_local_adam_equals_dense_adam_on_the_same_rows():
    """Each row stepped once per 'epoch' with its own minibatch == torch Adam on the whole table."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(12, 5, generator=g)
    table = RepresentationTable(init, lr=0.05, betas=(0.5, 0.7))
    dense = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([dense], lr=0.05, betas=(0.5, 0.7))
    for epoch in range(6):
        grads = torch.randn(12, 5, generator=g)
        # row-local: three minibatches of four rows, in a shuffled order
        perm = torch.randperm(12, generator=g)
        for batch in perm.split(4):
            table.step(batch, grads[batch])
        # dense: one step with the gradient accumulated over the epoch
        opt.zero_grad()
        dense.grad = grads.clone()
        opt.step()
        torch.testing.assert_close(table.values, dense.detach(), rtol=1e-6, atol=1e-7)


def test_step_counts_are_per_row():
    table = RepresentationTable(torch.zeros(4, 2), lr=0.1)
    table.step(torch.tensor([0, 1]), torch.ones(2, 2))
    table.step(torch.tensor([1]), torch.ones(1, 2))
    assert table.steps.tolist() == [1, 2, 0, 0]
    # a first Adam step moves by lr in the direction against the gradient, whatever its size
    torch.testing.assert_close(table.values[0], torch.full((2,), -0.1))
    assert torch.equal(table.values[2:], torch.zeros(2, 2))


def test_rows_not_in_the_batch_are_untouched():
    init = torch.randn(6, 3)
    table = RepresentationTable(init)
    table.step(torch.tensor([1, 4]), torch.randn(2, 3))
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.equal(table.values[keep], init[keep])
    assert torch.equal(table.exp_avg[keep], torch.zeros(4, 3))


def test_gather_gives_a_leaf_that_collects_gradient():
    table = RepresentationTable(torch.arange(6.0).reshape(3, 2))
    z = table.gather(torch.tensor([2, 0]))
    (z**2).sum().backward()
    torch.testing.assert_close(z.grad, 2 * torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    assert table.values.grad is None


def test_releasing_the_optimizer_state_keeps_the_values():
    table = RepresentationTable(torch.randn(50, 4))
    table.step(torch.arange(10), torch.randn(10, 4))
    before = table.values.clone()
    table.release_optimizer_state()
    torch.testing.assert_close(table.values, before, rtol=0, atol=0)
    assert table.exp_avg.numel() == table.exp_avg_sq.numel() == table.steps.numel() == 0
