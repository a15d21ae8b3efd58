"""deepemd.labels: tree_emd against POT's exact LP and 1-D Wasserstein, gradients against
finite differences, the label-tree constructors and every bad input they reject."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from deepemd.errors import DeepEMDError
from deepemd.labels import LOSS_NAMES, LabelTree, TreeEMDLoss, chain, tree_emd


def random_tree(rng: np.random.Generator, n_leaves: int) -> tuple[LabelTree, np.ndarray]:
    """A random rooted tree with exactly ``n_leaves`` leaves and random lengths (some 0), and
    its leaf-to-leaf shortest paths computed independently (scipy Dijkstra on the graph)."""
    parent = [-1]
    children = [0]
    leaves = {0}
    while len(leaves) < n_leaves or (len(parent) == 1):
        # attach a new node under a random node; chains of single children appear too
        par = int(rng.integers(len(parent)))
        parent.append(par)
        children.append(0)
        children[par] += 1
        leaves.discard(par)
        leaves.add(len(parent) - 1)
    lengths = rng.uniform(0.0, 3.0, len(parent))
    lengths[rng.random(len(parent)) < 0.1] = 0.0
    names = [f"n{i}" for i in range(len(parent))]
    parents = {names[i]: names[parent[i]] for i in range(1, len(parent))}
    tree = LabelTree.from_parents(parents, {names[i]: lengths[i] for i in range(1, len(parent))})
    rows = list(range(1, len(parent)))
    graph = csr_matrix(
        ([lengths[i] + 1e-300 for i in rows], (rows, [parent[i] for i in rows])), shape=(len(parent),) * 2
    )
    dist = shortest_path(graph, directed=False)
    idx = [int(leaf[1:]) for leaf in tree.leaves]
    return tree, dist[np.ix_(idx, idx)]


def test_tree_emd_equals_exact_lp_on_300_random_trees():
    rng = np.random.default_rng(1611)
    worst = 0.0
    for trial in range(300):
        K = int(rng.integers(2, 201)) if trial >= 10 else 2 + trial
        tree, D = random_tree(rng, K)
        assert tree.num_classes == K
        np.testing.assert_allclose(tree.distance_matrix().numpy(), D, atol=1e-9)
        p = rng.dirichlet(np.full(K, 0.3))
        kind = trial % 3
        if kind == 0:  # soft vs soft
            q = rng.dirichlet(np.ones(K))
            got = tree_emd(torch.tensor(p), torch.tensor(q), tree)
        elif kind == 1:  # soft vs one-hot integer label
            label = int(rng.integers(K))
            q = np.eye(K)[label]
            got = tree_emd(torch.tensor(p)[None], torch.tensor([label]), tree)[0]
        else:  # one-hot vs one-hot
            p = np.eye(K)[int(rng.integers(K))]
            q = np.eye(K)[int(rng.integers(K))]
            got = tree_emd(torch.tensor(p), torch.tensor(q), tree)
        want = ot.emd2(p, q, D)
        worst = max(worst, abs(float(got) - want))
        assert float(got) == pytest.approx(want, abs=1e-9), (trial, K)
    assert worst < 1e-9


def test_batched_rows_are_independent_and_one_hot_float_equals_labels():
    rng = np.random.default_rng(0)
    tree, _ = random_tree(rng, 30)
    p = torch.tensor(rng.dirichlet(np.ones(30), size=7))
    labels = torch.tensor(rng.integers(30, size=7))
    batched = tree_emd(p, labels, tree)
    one_by_one = torch.stack([tree_emd(p[i], torch.eye(30, dtype=p.dtype)[labels[i]], tree) for i in range(7)])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-12)
    # with a one-hot target the EMD is the expected tree distance of the prediction
    D = tree.distance_matrix()
    torch.testing.assert_close(batched, (p * D[labels]).sum(1), rtol=0, atol=1e-12)


def test_chain_equals_wasserstein_1d():
    rng = np.random.default_rng(2)
    for _ in range(50):
        K = int(rng.integers(2, 60))
        gaps = rng.uniform(0.1, 2.0, K - 1)
        pos = np.concatenate([[0.0], np.cumsum(gaps)])
        p, q = rng.dirichlet(np.ones(K)), rng.dirichlet(np.ones(K))
        want = ot.wasserstein_1d(pos, pos, p, q, p=1)
        got = tree_emd(torch.tensor(p), torch.tensor(q), chain(K, spacing=gaps))
        assert float(got) == pytest.approx(float(want), abs=1e-9)
        np.testing.assert_allclose(
            chain(K, gaps).distance_matrix().numpy(), np.abs(pos[:, None] - pos[None]), atol=1e-12
        )


def test_chain_matches_the_same_path_built_as_a_general_tree():
    gaps = [1.0, 2.0, 0.5, 1.5]
    # the path 0-1-2-3-4 as a caterpillar: classes hang by zero-length edges from a spine
    parents = {"s1": "s0", "s2": "s1", "s3": "s2", "s4": "s3", **{f"c{i}": f"s{i}" for i in range(5)}}
    lengths = {"s1": 1.0, "s2": 2.0, "s3": 0.5, "s4": 1.5, **{f"c{i}": 0.0 for i in range(5)}}
    general = LabelTree.from_parents(parents, lengths, classes=[f"c{i}" for i in range(5)])
    rng = np.random.default_rng(3)
    p, q = (torch.tensor(rng.dirichlet(np.ones(5), size=4)) for _ in range(2))
    for rho in (1.0, 2.0, 1.5):
        torch.testing.assert_close(tree_emd(p, q, chain(5, gaps), rho), tree_emd(p, q, general, rho))


def test_relaxed_form_is_edgewise_power():
    rng = np.random.default_rng(4)
    tree, _ = random_tree(rng, 12)
    inc, w = tree.incidence()
    p, q = (torch.tensor(rng.dirichlet(np.ones(12), size=3)) for _ in range(2))
    m = (p - q) @ inc.T
    for rho in (0.5, 1.0, 2.0, 3.0):
        torch.testing.assert_close(tree_emd(p, q, tree, rho), (m.abs() ** rho * w).sum(1))
    # squared EMD on a unit chain = (K-1) x RPS of the CDFs
    K = 6
    p = torch.tensor(rng.dirichlet(np.ones(K)))
    rps_sum = ((torch.cumsum(p, 0) - torch.cumsum(torch.eye(K, dtype=p.dtype)[2], 0))[:-1] ** 2).sum()
    torch.testing.assert_close(tree_emd(p, torch.tensor(2), chain(K), rho=2), rps_sum)


@pytest.mark.parametrize("rho", [1.0, 1.5, 2.0])
def test_gradients_match_central_finite_differences(rho):
    rng = np.random.default_rng(5)
    tree, _ = random_tree(rng, 15)
    p = torch.tensor(rng.dirichlet(np.ones(15), size=3), requires_grad=True)
    q = torch.tensor(rng.dirichlet(np.ones(15), size=3))
    # random masses make every edge difference non-zero: the function is differentiable there
    assert torch.autograd.gradcheck(lambda x: tree_emd(x, q, tree, rho), (p,), eps=1e-7, atol=1e-6)
    c = torch.tensor(rng.dirichlet(np.ones(8), size=2), requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: tree_emd(x, torch.tensor([0, 7]), chain(8, 0.7), rho), (c,), eps=1e-7, atol=1e-6
    )


def test_exact_gradient_is_the_closed_form_and_zero_at_the_optimum():
    rng = np.random.default_rng(6)
    tree, _ = random_tree(rng, 20)
    inc, w = tree.incidence()
    p = torch.tensor(rng.dirichlet(np.ones(20)), requires_grad=True)
    q = torch.tensor(rng.dirichlet(np.ones(20)))
    tree_emd(p, q, tree).backward()
    m = inc @ (p.detach() - q)
    torch.testing.assert_close(p.grad, inc.T @ (w * torch.sign(m)))  # sum of w_e sign(m_e) above each leaf
    same = q.clone().requires_grad_(True)
    value = tree_emd(same, q, tree, rho=1)
    value.backward()
    assert value.item() == 0.0 and torch.all(same.grad == 0)  # sign(0) = 0 is a valid subgradient


def test_float32_and_device():
    rng = np.random.default_rng(7)
    tree, _ = random_tree(rng, 50)
    p64 = torch.tensor(rng.dirichlet(np.ones(50), size=4))
    y = torch.tensor(rng.integers(50, size=4))
    want = tree_emd(p64, y, tree)
    got = tree_emd(p64.float(), y, tree)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if torch.cuda.is_available():
        torch.testing.assert_close(tree_emd(p64.cuda(), y.cuda(), tree).cpu(), want)


def test_constructors_agree(tmp_path):
    parents = {"cat": "animal", "dog": "animal", "car": "thing", "animal": "root", "thing": "root"}
    a = LabelTree.from_parents(parents, lengths={"car": 3.0})
    (tmp_path / "h.csv").write_text(
        "class,parent,edge_length\ncat,animal,\ndog,animal\ncar,thing,3\nanimal,root\nthing,root\n"
    )
    b = LabelTree.from_csv(tmp_path / "h.csv")
    for leaf in ("animal/cat", "animal/dog", "thing/car"):
        (tmp_path / "imgs" / leaf).mkdir(parents=True)
        (tmp_path / "imgs" / leaf / "0.png").write_bytes(b"")
    c = LabelTree.from_folders(tmp_path / "imgs")
    assert a.leaves == b.leaves == ("car", "cat", "dog")
    assert c.leaves == ("animal/cat", "animal/dog", "thing/car")
    torch.testing.assert_close(a.distance_matrix(), b.distance_matrix())
    assert a.distance_matrix()[0].tolist() == [0.0, 6.0, 6.0]
    assert c.distance_matrix().tolist() == [[0, 2, 4], [2, 0, 4], [4, 4, 0]]
    # an empty parent cell hangs the node from an implicit root
    (tmp_path / "forest.csv").write_text("cat,animal\ndog,animal\ncar,\nanimal,\n")
    assert LabelTree.from_csv(tmp_path / "forest.csv").distance_matrix()[0].tolist() == [0.0, 3.0, 3.0]


def test_restrict_keeps_distances_and_order():
    rng = np.random.default_rng(8)
    tree, D = random_tree(rng, 25)
    pick = [tree.leaves[i] for i in (20, 3, 7, 11)]
    sub = tree.restrict(pick)
    assert sub.leaves == tuple(pick)
    idx = [tree.leaves.index(c) for c in pick]
    np.testing.assert_allclose(sub.distance_matrix().numpy(), D[np.ix_(idx, idx)], atol=1e-9)
    c = chain(6, [1, 2, 3, 4, 5]).restrict(["1", "3", "4"])
    assert c.is_chain and c.distance_matrix().tolist() == [[0, 5, 9], [5, 0, 4], [9, 4, 0]]


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda: LabelTree.from_parents({"a": "b", "b": "c", "c": "a"}), "cycle"),
        (lambda: LabelTree.from_parents({"a": "r", "b": "r", "x": "y", "y": "x"}), "cycle"),
        (lambda: LabelTree.from_parents({"a": "a"}), "cycle"),
        (lambda: LabelTree.from_parents({"a": "r1", "b": "r2"}), "2 roots"),
        (lambda: LabelTree.from_parents({"a": "r", "b": "r"}, lengths={"zebra": 1.0}), "unknown class"),
        (lambda: LabelTree.from_parents({"a": "r", "b": "r"}, lengths={"a": -1.0}), "negative"),
        (lambda: LabelTree.from_parents({"a": "r", "b": "r"}, lengths={"a": float("nan")}), "non-finite"),
        (
            lambda: LabelTree.from_parents({"a": "g", "b": "g", "g": "r"}, classes=["a", "c"]),
            "missing from the hierarchy",
        ),
        (lambda: LabelTree.from_parents({"a": "g", "b": "g", "g": "r"}, classes=["a", "g"]), "inner node"),
        (lambda: LabelTree.from_parents({}), "empty"),
        (lambda: chain(1), "at least 2"),
        (lambda: chain(3, [1.0, -2.0]), "negative"),
        (lambda: tree_emd(torch.ones(1, 2) / 2, torch.tensor([0]), chain(2), rho=0), "rho"),
        (lambda: tree_emd(torch.ones(1, 2) / 2, torch.tensor([0]), chain(2), rho=-1), "rho"),
        (lambda: tree_emd(torch.ones(1, 3) / 3, torch.tensor([0]), chain(2)), "do not fit"),
        (lambda: tree_emd(torch.ones(1, 2) / 2, torch.tensor([2]), chain(2)), "unknown class index"),
        (lambda: tree_emd(torch.ones(2, 2) / 2, torch.ones(2, 3) / 3, chain(2)), "do not match"),
        (lambda: TreeEMDLoss(chain(2), rho=0), "rho"),
        (lambda: TreeEMDLoss.from_name("hinge", chain(2)), "unknown label loss"),
        (lambda: chain(3).index("7"), "unknown class"),
    ],
)
def test_bad_inputs_give_one_clear_error(make, phrase):
    with pytest.raises(DeepEMDError, match=phrase):
        make()


def test_bad_files(tmp_path):
    (tmp_path / "two.csv").write_text("a,g1\na,g2\ng1,r\ng2,r\n")
    with pytest.raises(DeepEMDError, match="two parents"):
        LabelTree.from_csv(tmp_path / "two.csv")
    (tmp_path / "neg.csv").write_text("class,parent,edge_length\na,r,1\nb,r,-0.5\n")
    with pytest.raises(DeepEMDError, match="negative") as err:
        LabelTree.from_csv(tmp_path / "neg.csv")
    assert "neg.csv" in str(err.value)
    (tmp_path / "cyc.csv").write_text("a,r\nb,r\nr,x\nx,r\n")
    with pytest.raises(DeepEMDError, match="cycle in the hierarchy: (r -> x -> r|x -> r -> x)"):
        LabelTree.from_csv(tmp_path / "cyc.csv")
    (tmp_path / "mixed" / "a" / "b").mkdir(parents=True)
    (tmp_path / "mixed" / "a" / "b" / "0.png").write_bytes(b"")
    (tmp_path / "mixed" / "a" / "1.png").write_bytes(b"")
    with pytest.raises(DeepEMDError, match="both images and class folders"):
        LabelTree.from_folders(tmp_path / "mixed")
    with pytest.raises(DeepEMDError, match="not found"):
        LabelTree.from_csv(tmp_path / "nope.csv")


def test_loss_configurations_share_one_class():
    tree = LabelTree.from_parents({"a": "g", "b": "g", "c": "h", "d": "h", "g": "r", "h": "r"})
    logits = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    probs = logits.softmax(1)
    ce = torch.nn.functional.cross_entropy(logits, y)
    losses = {name: TreeEMDLoss.from_name(name, tree) for name in LOSS_NAMES}
    torch.testing.assert_close(losses["ce"](logits, y), ce)
    torch.testing.assert_close(losses["emd"](logits, y), tree_emd(probs, y, tree).mean())
    torch.testing.assert_close(losses["relaxed-emd"](logits, y), tree_emd(probs, y, tree, 2).mean())
    torch.testing.assert_close(losses["ce+relaxed-emd"](logits, y), ce + tree_emd(probs, y, tree, 2).mean())
    # probabilities in, soft targets in
    soft = torch.full((5, 4), 0.25, dtype=torch.float64)
    loss = TreeEMDLoss(tree, rho=1, from_logits=False, ce_weight=0.5)
    want = tree_emd(probs, soft, tree).mean() + 0.5 * -(soft * probs.log()).sum(1).mean()
    torch.testing.assert_close(loss(probs, soft), want)
    assert TreeEMDLoss.from_name("relaxed-emd", tree, rho=3).rho == 3.0


def test_training_with_the_loss_lowers_it():
    tree = chain(5)
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = (x[:, 0] * 1.5 + 2).round().clamp(0, 4).long()
    head = torch.nn.Linear(3, 5)
    loss_fn = TreeEMDLoss(tree, rho=2)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = loss_fn(head(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(head(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
